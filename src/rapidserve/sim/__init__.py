"""The serving simulator (`rapidserve simulate`): the project's own schedulers, worker turns and
partition policies on a virtual clock, with steps priced by the step-cost model."""
