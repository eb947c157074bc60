"""Soak: 2,000 steps of a microscopic model with an orbax checkpoint every 50 steps (async, keep
3). The checkpoint directory never holds more than keep + 1 steps (the newest may be in flight),
ends with exactly the last three, leaves no temporary directory, and the process's open file
descriptors do not grow."""

import os
import threading
import time

import pytest

from lora_jax.train import sharding as shd
from lora_jax.train.checkpoint import Checkpointer
from lora_jax.train.files import leftovers
from lora_jax.train.metrics import MetricsWriter, read_metrics
from lora_jax.train.trainer import LoopSpec, Trainer

from train_helpers import toy_logits, toy_params, toy_rows

STEPS, EVERY, KEEP = 2000, 50, 3


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def _du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except FileNotFoundError:  # deleted by orbax while we walked
                pass
    return total


def _step_entries(ck):
    try:
        return [n for n in os.listdir(ck) if n.split(".")[0].isdigit()]
    except FileNotFoundError:
        return []


class _Sampler(MetricsWriter):
    """At every train record (every 50 steps, just before that step's checkpoint is saved):
    step directories, bytes and open file descriptors."""

    def __init__(self, path, ck):
        super().__init__(path)
        self.ck, self.samples = ck, []
        self.checkpointer, self.quiet_fds = None, {}

    def write(self, record):
        super().write(record)
        if record["kind"] == "train":
            self.samples.append((record["step"], len(_step_entries(self.ck)), _du(self.ck), _open_fds()))
            if record["step"] % (10 * EVERY) == 0:  # no save in flight: nothing should be open but the same
                self.checkpointer.wait()
                self.quiet_fds[record["step"]] = _open_fds()


@pytest.mark.slow
def test_two_thousand_steps_keep_disk_and_file_descriptors_bounded(tmp_path):
    ck_dir = str(tmp_path / "checkpoints")
    spec = LoopSpec(steps=STEPS, batch_size=8, lr=0.01, optimizer="adam", warmup_steps=0, log_every=EVERY,
                    checkpoint_every=EVERY, keep_checkpoints=KEEP, async_checkpoint=True, progress=False)
    metrics = _Sampler(str(tmp_path / "metrics.jsonl"), ck_dir)
    ck = Checkpointer(ck_dir, keep=KEEP, async_save=True)
    metrics.checkpointer = ck
    tr = Trainer(spec, mesh=shd.make_mesh(1, 1, 1), logits_fn=toy_logits, trainable=toy_params(),
                 rows=toy_rows(256), seed=0, metrics=metrics, checkpointer=ck, echo=lambda *a: None)

    most, stop = [0], threading.Event()

    def watch():  # finer-grained than the records: catches a save between finalize and cleanup
        while not stop.is_set():
            most[0] = max(most[0], len(_step_entries(ck_dir)))
            time.sleep(0.002)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    t0 = time.perf_counter()
    try:
        res = tr.fit()
    finally:
        stop.set()
        w.join()
        ck.wait()
    took = time.perf_counter() - t0
    end_fds = _open_fds()
    ck.close()
    metrics.close()
    assert res["step"] == STEPS

    samples = metrics.samples
    assert [s for s, *_ in samples] == list(range(EVERY, STEPS + 1, EVERY))
    assert max(n for _, n, _, _ in samples) <= KEEP + 1 and most[0] <= KEEP + 1, (most, samples[:5])
    final = sorted(os.listdir(ck_dir))
    assert final == [str(STEPS - EVERY * k) for k in (2, 1, 0)]
    sizes = [_du(os.path.join(ck_dir, n)) for n in final]
    assert _du(ck_dir) == sum(sizes) and min(sizes) > 0  # the three checkpoints and nothing else
    assert max(sizes) <= 1.5 * min(sizes), sizes  # (orbax's files vary a little in size)
    one = max(sizes)
    # bytes on disk were bounded all along: keep finished checkpoints + one in flight, which holds
    # orbax's per-process data files besides the merged ones until it is finalized (up to ~2x)
    assert max(b for _, _, b, _ in samples) <= (KEEP + 2.5) * one, [b for _, _, b, _ in samples]
    # nothing temporary anywhere in the run directory
    for root, dirs, files in os.walk(tmp_path):
        assert not [n for n in dirs + files if ".orbax-checkpoint-tmp" in n], root
        assert leftovers(root) == [], root
    # open file descriptors: while a save is in flight they come and go (its files); with none in
    # flight (after 10, 20, 30, 40 checkpoints and at the end) the count is the same every time
    quiet = list(metrics.quiet_fds.values()) + [end_fds]
    assert len(quiet) == 5 and max(quiet) == min(quiet), (metrics.quiet_fds, end_fds)
    fds = [f for s, _, _, f in samples]
    assert len(read_metrics(str(tmp_path / "metrics.jsonl"))) == STEPS // EVERY
    print(f"soak: {STEPS} steps, {STEPS // EVERY} checkpoints in {took:.1f}s; checkpoint {one} bytes; "
          f"fds {min(fds)}..{max(fds)}, with no save in flight {quiet}; most step dirs seen {most[0]}")
