"""``python -m bench.bare_model MODEL BATCH``: CPU per frame of bare ``InferenceSession.run``, as JSON.

Run in a process of its own so that its CPU is the model's alone (a benchmark process holds channels, pools and
other sessions whose threads would be counted with it).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("batch", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--spinning", action="store_true", help="spin during runs (stopping when a run returns)")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if args.spinning else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    inputs = {i.name: i.shape[1:] for i in session.get_inputs()}
    feeds = {name: rng.uniform(0, 1, (args.batch, *shape)).astype(np.float32) for name, shape in inputs.items()}
    for _ in range(3):
        session.run(None, feeds)
    runs = 0
    cpu, wall = time.process_time(), time.perf_counter()
    while runs < 3 or time.perf_counter() - wall < args.seconds:
        session.run(None, feeds)
        runs += 1
    used = time.process_time() - cpu
    print(json.dumps({"cpu_ms_per_frame": used * 1000 / (runs * args.batch), "runs": runs, "pid": os.getpid()}))


if __name__ == "__main__":
    main()
