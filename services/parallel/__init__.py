"""Model parallelism for the target: tensor- and pipeline-parallel ranks over torch.distributed.

Rank 0 runs the engine (scheduler, sampling, gRPC) and, each step,
broadcasts the step's rows; every rank runs the same ModelRunner code on its
shard (:mod:`.shard`), micro-batches flowing between pipeline stages
(:mod:`.stage`). :mod:`.launch` starts and watches the worker ranks.
"""
