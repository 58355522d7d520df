"""How the plain forward of ``dlm-tasks`` scales with the number of positions fed (the Decode ceiling).

    $ python benchmarks/dlm_forward_cost.py      # one CPU thread; writes benchmarks/results/dlm-forward-cost.{json,md}

A cached Decode step at the dllm bench's settings feeds about 53 % of a short-prompt sequence
(149 positions: a <= 21-token prompt and a 128-token answer); this measures what such a forward
costs against the full one, so the fixed share that caps Decode's speedup is a recorded figure.
Median of 200 timed calls after 20 warm-up calls, batch 1, fp32, no cache.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from accel.bench import hardware
from pipelines.zoo import load_reference

POSITIONS = (8, 40, 80, 149)


@torch.no_grad()
def main(out: Path = Path("benchmarks/results/dlm-forward-cost.json")) -> None:
    torch.set_num_threads(1)
    model = load_reference("dlm-tasks").model
    rows = []
    for n in POSITIONS:
        ids = torch.randint(0, model.config.vocab_size, (1, n))
        pos = torch.arange(n)[None]
        for _ in range(20):
            model(input_ids=ids, position_ids=pos)
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            model(input_ids=ids, position_ids=pos)
            times.append(time.perf_counter() - t0)
        rows.append({"positions": n, "ms": 1000 * statistics.median(times)})
    full = rows[-1]["ms"]
    for r in rows:
        r["full_over_this"] = full / r["ms"]
    report = {"command": "python " + " ".join(sys.argv), "threads": 1, "rows": rows, "hardware": hardware()}
    out.write_text(json.dumps(report, indent=1))
    md = ["# dlm-tasks: plain forward cost by positions fed", "", f"`{report['command']}`; one thread, batch 1, "
          "fp32, median of 200 calls.", "", "| positions | ms | full (149) / this |", "|---|---|---|",
          *[f"| {r['positions']} | {r['ms']:.2f} | {r['full_over_this']:.2f}x |" for r in rows], "",
          f"Hardware: {report['hardware']}", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
