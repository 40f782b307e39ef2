"""`matekd train ARGS` under a host-memory budget (tests/test_zero3_loading.py).

A watchdog thread samples this process's resident set every 5 ms. Its growth above the RSS
measured at start-up (after the libraries are imported, so that only what the run allocates
counts) must stay under MATEKD_RSS_BUDGET bytes; past it the process writes how far it got to
MATEKD_RSS_REPORT.<rank> and exits at once with code 86, as an out-of-memory kill would. Without
a budget it only records the peak growth.

    deepspeed --num_gpus 2 tests/rss_budget_run.py train --config ... (or python tests/rss_budget_run.py ...)
"""

from __future__ import annotations

import json
import os
import sys
import threading

# every library the run uses, imported before the baseline is taken (hence unused here)
import deepspeed.runtime.zero.partition_parameters  # noqa: F401 - imported for the baseline
import torch._dynamo  # noqa: F401 - imported for the baseline
import transformers.models.bert.modeling_bert  # noqa: F401 - imported for the baseline

import matekd_ds.pipeline  # noqa: F401 - imported for the baseline
from matekd_ds.cli import main

OVER_BUDGET = 86


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def watch(baseline: int, budget: int | None, report: str, peak: list[int], stop: threading.Event) -> None:
    while not stop.wait(0.005):
        peak[0] = max(peak[0], rss() - baseline)
        if budget is not None and peak[0] > budget:
            with open(report, "w") as f:
                json.dump({"peak_growth": peak[0], "budget": budget, "over_budget": True}, f)
            os._exit(OVER_BUDGET)


if __name__ == "__main__":
    budget = int(os.environ["MATEKD_RSS_BUDGET"]) if os.environ.get("MATEKD_RSS_BUDGET") else None
    report = f"{os.environ['MATEKD_RSS_REPORT']}.{os.environ.get('RANK', '0')}"
    peak, stop = [0], threading.Event()
    thread = threading.Thread(target=watch, args=(rss(), budget, report, peak, stop), daemon=True)
    thread.start()
    code = main([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    stop.set()
    thread.join()
    with open(report, "w") as f:
        json.dump({"peak_growth": peak[0], "budget": budget, "over_budget": False, "exit": code}, f)
    sys.exit(code)
