"""Pipeline fuzzing: random valid graphs through random orders of lossless passes.

Each example draws a model from the shared strategy and a random pass order, runs it with
`--verify each`, and checks onnxruntime outputs against the original. Prints the seed first;
a failure is saved as `fuzz/crashers/<seed>-<n>.onnx` plus the pipeline that broke it.

    python -m fuzz.fuzz_pipeline --examples 50000 [--seed N]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import onnx
from hypothesis import given
from hypothesis import strategies as st

import dsopt
from dsopt import numerics
from dsopt.plugin import PluginHost
from dsopt.testing import strategies
from fuzz import campaign_settings

CRASHERS = Path(__file__).with_name("crashers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    run_seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed={run_seed}", flush=True)
    host = PluginHost()
    lossless = sorted(p.name for p in host.passes if p.exactness != "lossy")
    counter = {"n": 0, "changed": 0}
    started = time.time()

    @campaign_settings(args.examples, run_seed)
    @given(
        model=strategies.models(), order=st.lists(st.sampled_from(lossless), min_size=1, max_size=8)
    )
    def campaign(model: onnx.ModelProto, order: list[str]) -> None:
        counter["n"] += 1
        text = ",".join(order)
        try:
            # Calibration feeds for the passes that need them (smooth-activations).
            calib = [strategies.random_feeds(model, seed=i) for i in range(2)]
            result = dsopt.optimize(model, passes=text, verify="each", host=host, calibration=calib)
            optimized = result.module.to_proto()
            report = numerics.check_equivalence(
                model, optimized, inputs=[strategies.random_feeds(model)], rtol=1e-4, atol=1e-5
            )
            assert report.ok, report.to_dict()
            counter["changed"] += any(p.changed for p in result.report.passes)
        except BaseException:
            CRASHERS.mkdir(exist_ok=True)
            stem = CRASHERS / f"{run_seed}-{counter['n']}"
            onnx.save_model(model, f"{stem}.onnx")
            Path(f"{stem}.txt").write_text(
                f"dsopt optimize {stem}.onnx --passes '{text}' --verify each --check "
                "-o /tmp/o.onnx\n"
            )
            raise

    campaign()
    elapsed = time.time() - started
    print(
        f"ok: {counter['n']} examples ({counter['changed']} changed by a pass) in "
        f"{elapsed:.0f}s, seed={run_seed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
