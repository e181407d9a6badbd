"""CPU illustration of the layer-group prefill (docs/partitioning.md): how long the rapid prefill
worker takes to follow partition switches with whole prompts (--prefill-max-step-ms 0) and with
layer groups, on a stand-in 16-"SM" mechanism (CPU has none) and a policy that toggles between the
whole device and a split every 60 ms, while long prompts prefill beside a decode.

.venv/bin/python scripts/prefill_reaction_cpu.py [MS ...]   (default: 0 20)

A random 8-layer Llama (hidden 256) with 1500-token prompts; on a CPU one layer of such a prompt
takes far longer than 20 ms, so groups are single layers and the reaction is about half a layer.
"""

import random
import sys
import tempfile
import time

import torch
import transformers

import rapidserve.serving.partitioning as sp
from rapidserve import SamplingParams
from rapidserve.config import EngineConfig
from rapidserve.engine import create_engine
from rapidserve.resources.partition import Granted, Partition, PhaseStreams

TOTAL = 16


class StandInPartitioner:
    """Partitions of a 16-SM device with no streams (as tests/test_rapid_partitioning.py's)."""

    def __init__(self, device, partitioned=True, side="both"):
        self.total_sms, self.granularity, self.prepared = TOTAL, 8, []

    def prepare(self, partitions):
        self.prepared = list(partitions)
        return [Granted(p, p.decode_share(TOTAL), p.prefill_share(TOTAL)) for p in self.prepared]

    def streams(self, partition):
        return PhaseStreams(None, None)

    def close(self):
        pass


class Toggle:
    """The whole device and D8/P8 in turn, 60 ms each: decisions at random phases of the prefill."""

    name, partitioned = "toggle", True

    def partitions(self):
        return (Partition.FULL, Partition.split(8, TOTAL))

    def decide(self, state):
        return self.partitions()[int(time.monotonic() / 0.060) % 2]


def main() -> None:
    bounds = [float(a) for a in sys.argv[1:]] or [0.0, 20.0]
    sp.make_partitioner = StandInPartitioner
    sp.make_policy = lambda *a, **k: Toggle()
    path = tempfile.mkdtemp(prefix="reaction-model-")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(1500)] for _ in range(6)]
    for ms in bounds:
        engine = create_engine(EngineConfig(model=path, device="cpu", mode="rapid", placement="thread",
                                            partition_policy="static:8", prefill_max_step_ms=ms,
                                            kv_cache_memory_bytes="256MiB"))
        try:
            t0 = time.monotonic()
            engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
            for p in prompts:
                engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
            while engine.has_unfinished_requests():
                engine.step()
            s = engine.worker_stats.partition
            print(f"--prefill-max-step-ms {ms:g}: {s.reactions} switches followed, reaction mean "
                  f"{1e3 * s.reaction_s / max(1, s.reactions):.0f} ms, max {1e3 * s.reaction_max_s:.0f} ms; "
                  f"run {time.monotonic() - t0:.1f} s", flush=True)
        finally:
            engine.shutdown()


if __name__ == "__main__":
    main()
