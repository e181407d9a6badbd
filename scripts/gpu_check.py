import time, random, sys, logging, json, os
import torch
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from rapidserve import LLM, SamplingParams
res = {}
t = time.perf_counter()
eager = "--eager" in sys.argv
backend = "torch" if "--torch" in sys.argv else "auto"
llm = LLM(model="preset:llama-3.1-8b", load_format="dummy", max_model_len=4096,
          enforce_eager=eager, attention_backend=backend)
torch.cuda.synchronize(); res["load_s"] = time.perf_counter() - t
eng = llm.engine
res["kv_blocks"] = eng.blocks.num_blocks; res["kv_gib"] = eng.cache.nbytes / 2**30
res["dtype"] = str(eng.dtype)
rng = random.Random(0)
for n_req, plen, olen in [(1, 512, 32), (32, 512, 32), (64, 1024, 64)]:
    prompts = [[rng.randrange(128000) for _ in range(plen)] for _ in range(n_req)]
    p = SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True)
    torch.cuda.synchronize(); t = time.perf_counter()
    outs = llm.generate(prompts, p)
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == olen for o in outs)
    res[f"gen_{n_req}x{plen}+{olen}_s"] = round(dt, 2)
    res[f"gen_{n_req}x{plen}+{olen}_out_tok_s"] = round(n_req * olen / dt, 1)
# decode step time at batch 1 (eager torch path) and prefill rate
eng2 = eng
rid = eng.add_request([1] * 1024, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
eng.step()  # prefill 1024
torch.cuda.synchronize()
times = []
while eng.has_unfinished_requests():
    t = time.perf_counter(); eng.step(); torch.cuda.synchronize(); times.append(time.perf_counter() - t)
res["mode"] = f"backend={llm.engine.backend.name} graphs={llm.engine.use_graphs}"
res["decode_step_b1_ms_median"] = round(sorted(times)[len(times)//2] * 1000, 2)
rid = eng.add_request([1] * 2048, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
torch.cuda.synchronize(); t = time.perf_counter(); eng.step(); torch.cuda.synchronize()
res["prefill_2048_ms"] = round((time.perf_counter() - t) * 1000, 1)
res["prefill_2048_tflops"] = round(16.06e9 * 2048 / ((time.perf_counter() - t)) / 1e12, 1)
print(json.dumps(res, indent=1))
name = "gpu_check" + ("_eager" if eager else "") + ("_torch" if backend == "torch" else "")
json.dump(res, open(os.environ.get("OUT", ".") + f"/{name}.json", "w"), indent=1)
