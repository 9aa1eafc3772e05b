"""One tensor-parallel rank, for tests/gpu_worker/test_tensor_parallel.py.

    python tests/gpu_worker/tp_rank.py SPEC.json RANK OUT.json

SPEC holds the engine config's path, the runner's overrides, the prompts and max_tokens (and
optionally logits_out: where rank 0 saves the first step's logits). Every rank joins the group
through the real GroupLink (the worker's rendezvous and plan fan-out). Rank 0 drives the real
scheduler in-process (launcher.inprocess) and forwards each plan as the worker process does;
the others run what it forwards. OUT gets the greedy outputs (rank 0) and the bytes of
checkpoint each rank read.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import msgspec  # noqa: E402
import torch  # noqa: E402

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from zeroserve.gpu_worker.parallel import GroupLink  # noqa: E402
from zeroserve.launcher.inprocess import InProcessEngine  # noqa: E402
from zeroserve.shared.config import read_config  # noqa: E402
from zeroserve.shared.messages import SamplingParams, WorkerExit  # noqa: E402


def main(spec_path: str, rank: int, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    config = read_config(spec["config"])
    link = GroupLink(config, 0, rank)
    tp = link.start(torch.device("cpu"), 120.0)
    runner = ModelRunner(RunnerConfig(**spec["runner"]), tp)
    out: dict = {"bytes_read": runner.read_stats.bytes_read, "summary": runner.quantization_summary}
    encoder = msgspec.msgpack.Encoder()
    if rank == 0:
        if spec.get("logits_out"):  # the first step's gathered logits [B, V], for tolerance checks
            compute_logits = runner.model.compute_logits

            def first_logits(hidden):
                logits = compute_logits(hidden)
                if not os.path.exists(spec["logits_out"]):
                    torch.save(logits, spec["logits_out"])
                return logits

            runner.model.compute_logits = first_logits
        execute = runner.execute

        def forward_then_execute(plan):
            link.forward(encoder.encode(plan))
            return execute(plan)

        runner.execute = forward_then_execute
        params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
        out["outputs"] = InProcessEngine(runner).generate(spec["prompts"], params)
        link.forward(encoder.encode(WorkerExit(reason="done")))
        link.close(linger_s=10.0)  # the exit must reach the others before os._exit below
    else:
        while not isinstance(plan := link.receive(), WorkerExit):
            runner.execute(plan)
    with open(out_path, "w") as f:
        json.dump(out, f)
    sys.stdout.flush()
    os._exit(0)  # the gloo group's destructors may abort the interpreter's teardown (as in the worker)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
