"""Writing the teacher cache: validation, resume, staged shard-by-shard writes, the background writer and
SIGKILL safety."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_samples import (
    FINGERPRINT,
    assert_same_store,
    counts,
    make_samples,
    small_layout,
    snapshot,
    write_store,
)

import pipeline.cache.store as cache_store
import pipeline.cache.writer as cache_writer
from pipeline.cache.background import AsyncWriter
from pipeline.cache.store import CacheReader
from pipeline.cache.writer import CacheWriter
from pipeline.errors import MimicError

REPO = Path(__file__).resolve().parents[1]


def test_no_topk_and_write_validation(tmp_path):
    layout = small_layout(topk=0)
    samples = make_samples(layout, 3)
    writer = CacheWriter.open(tmp_path / "c", FINGERPRINT, layout, *counts(samples))
    states = samples[0][0]
    with pytest.raises(MimicError, match="topk=0"):
        writer.write(0, states, torch.zeros(1, 5), torch.zeros(1, 5, dtype=torch.int64))
    with pytest.raises(MimicError, match=r"sample 0: states is \(3, \d+, 63\)"):
        writer.write(0, states[..., :63])
    with pytest.raises(MimicError, match=r"\) float16, the layout and counts need \(3, \d+, 64\) float32"):
        writer.write(0, states.half())
    with pytest.raises(MimicError, match="out of range"):
        writer.write(3, states)
    writer.write(0, states)
    with pytest.raises(MimicError, match="already written"):
        writer.write(0, states)
    writer.write(1, samples[1][0])
    writer.write(2, samples[2][0])
    writer.finish()
    assert CacheReader.open(tmp_path / "c").read(2)[1:] == (None, None)


def test_incomplete_store_is_refused_and_resumed(tmp_path, monkeypatch):
    layout = small_layout(codec="int8")
    samples = make_samples(layout, 5)
    path = tmp_path / "c"
    with CacheWriter.open(path, FINGERPRINT, layout, *counts(samples)) as writer:
        writer.write(3, *samples[3])
        writer.write(1, *samples[1])
        with pytest.raises(MimicError, match="cannot finish, 3 of 5 samples are missing"):
            writer.finish()
        with pytest.raises(MimicError, match="being written by another process"):
            CacheWriter.open(path, FINGERPRINT, layout, *counts(samples))
        # A crash after sample 0's data is in place but before its marker: it must count as missing.
        monkeypatch.setattr(cache_writer, "checksum", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            writer.write(0, *samples[0])
        monkeypatch.undo()
    with pytest.raises(
        MimicError, match=r"is incomplete \(2 of 5 samples\); rerun mimic extract to finish it"
    ):
        CacheReader.open(path)
    writer = CacheWriter.open(path, FINGERPRINT, layout, *counts(samples))
    assert writer.done == {1, 3} and writer.missing() == [0, 2, 4] and not writer.complete
    for i in writer.missing():
        writer.write(i, *samples[i])
    writer.finish()
    write_store(tmp_path / "ref", layout, samples)
    assert_same_store(path, tmp_path / "ref")


def test_rerun_of_complete_store_changes_nothing(tmp_path):
    layout = small_layout()
    samples = make_samples(layout, 4)
    write_store(tmp_path / "c", layout, samples)
    before = snapshot(tmp_path / "c")
    writer = CacheWriter.open(tmp_path / "c", FINGERPRINT, layout, *counts(samples))
    assert writer.complete and writer.missing() == []
    with pytest.raises(MimicError, match="is complete; nothing to write"):
        writer.write(0, *samples[0])
    writer.finish()
    assert snapshot(tmp_path / "c") == before


class RecordingArray:
    """Stands in for a store array and its ShardWriter; records the token-axis rows of every write."""

    def __init__(self, array, shards) -> None:
        self.array, self.shards, self.writes, self.via_shards = array, shards, [], []

    def __setitem__(self, key, value) -> None:  # through zarr
        self.writes.append((key[1].start, key[1].stop))
        self.array[key] = value

    def write_many(self, shards, pool=None) -> None:  # whole shards, bypassing zarr
        for shard, _ in shards:
            start = shard * self.shards.shard_rows
            self.writes.append((start, start + self.shards.rows(shard)))
            self.via_shards.append(self.writes[-1])
        self.shards.write_many(shards, pool)

    def rows(self, shard) -> int:
        return self.shards.rows(shard)


@pytest.mark.parametrize("codec", ["lossless", "int8"])
def test_staged_writes_go_shard_by_shard(tmp_path, codec):
    layout = small_layout(codec=codec)  # 16 tokens per chunk, 4 chunks per shard: 64-row shards
    shard = 64
    samples = make_samples(layout, 16)
    ends = np.cumsum(counts(samples)[0])
    writer = CacheWriter.open(tmp_path / "c", FINGERPRINT, layout, *counts(samples))
    name = "states" if codec == "lossless" else "states_q"
    recorder = RecordingArray(writer._store.arrays[name], writer._shards[name])
    recorder.shard_rows = shard
    writer._store.arrays[name] = writer._shards[name] = recorder
    for first in range(0, 16, 3):
        writer.write_many([(i, *samples[i]) for i in range(first, min(first + 3, 16))], flush=False)
        # exactly the samples that end at or before the last whole shard written so far are marked
        cut = max((stop for _, stop in recorder.writes), default=0)
        assert writer.done == {i for i in range(16) if ends[i] <= cut}
        assert all(stop % shard == 0 for _, stop in recorder.writes)
    assert len(writer.done) < 16, "nothing was left staged"
    writer.finish()
    writes = recorder.writes
    assert writes[0][0] == 0 and writes[-1][1] == ends[-1]
    assert all(a[1] == b[0] for a, b in zip(writes, writes[1:])), "writes must tile the token axis"
    assert len(writes) == -(-int(ends[-1]) // shard), "one write per shard"
    assert recorder.via_shards == writes, "whole shards, the last shorter one too, skip zarr"
    write_store(tmp_path / "ref", layout, samples)
    assert_same_store(tmp_path / "c", tmp_path / "ref")


@pytest.mark.parametrize("codec", ["lossless", "int8"])
def test_shards_written_directly_equal_zarrs_bytes(tmp_path, codec):
    layout = small_layout(codec=codec, dtype="bfloat16")
    samples = make_samples(layout, 30, seed=5)
    for name, direct in (("direct", True), ("zarr", False)):
        writer = CacheWriter.open(tmp_path / name, FINGERPRINT, layout, *counts(samples))
        if direct:  # every token-axis array has its ShardWriter
            assert len(writer._shards) == (1 if codec == "lossless" else 4) and all(writer._shards.values())
        else:
            writer._shards = {}  # every write through zarr
        for batch in (
            [4, 5, 6],
            [0, 1, 2, 3],
            list(range(7, 19)),
            [25, 26],
            list(range(19, 25)),
            [27, 28, 29],
        ):
            writer.write_many([(i, *samples[i]) for i in batch], flush=False)
        writer.finish()
    files = lambda root: {  # noqa: E731
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("c/**/*")) if p.is_file()
    }
    direct, via_zarr = files(tmp_path / "direct"), files(tmp_path / "zarr")
    assert direct.keys() == via_zarr.keys() and len(direct) > 4
    assert [k for k in direct if direct[k] != via_zarr[k]] == []


def test_closed_writer_writes_nothing(tmp_path):
    layout = small_layout()
    samples = make_samples(layout, 3)
    writer = CacheWriter.open(tmp_path / "c", FINGERPRINT, layout, *counts(samples))
    writer.write_many([(0, *samples[0])], flush=False)
    writer.close()  # the lock is released: another process may write now
    for call in (lambda: writer.write(1, *samples[1]), writer.flush, writer.finish):
        with pytest.raises(MimicError, match="this writer is closed; reopen the store"):
            call()
    again = CacheWriter.open(tmp_path / "c", FINGERPRINT, layout, *counts(samples))
    assert again.missing() == [0, 1, 2]  # the staged sample was never written


def test_staged_writes_in_any_order_equal_direct_writes(tmp_path):
    layout = small_layout(dtype="bfloat16")
    samples = make_samples(layout, 20, seed=3)
    writer = CacheWriter.open(tmp_path / "c", FINGERPRINT, layout, *counts(samples))
    writer.write_many([(i, *samples[i]) for i in (7, 8, 9, 2)], flush=False)
    with pytest.raises(MimicError, match="sample 8 is already written"):
        writer.write_many([(8, *samples[8])], flush=False)
    for batch in ([3, 4, 0], [1, 15, 16, 17], [18, 19, 5, 6], [10, 11, 12, 13, 14]):
        writer.write_many([(i, *samples[i]) for i in batch], flush=False)
    writer.finish()
    write_store(tmp_path / "ref", layout, samples)
    assert_same_store(tmp_path / "c", tmp_path / "ref")


def test_async_writer_round_trip_and_error(tmp_path):
    layout = small_layout(dtype="bfloat16")
    samples = make_samples(layout, 6)
    writer = CacheWriter.open(tmp_path / "c", FINGERPRINT, layout, *counts(samples))
    with AsyncWriter(writer, max_pending=2) as background:
        for i in reversed(range(6)):
            background.submit(i, *samples[i])
    writer.finish()
    write_store(tmp_path / "ref", layout, samples)
    assert_same_store(tmp_path / "c", tmp_path / "ref")

    writer = CacheWriter.open(tmp_path / "bad", FINGERPRINT, layout, *counts(samples))
    background = AsyncWriter(writer, max_pending=1)
    bad = (0, samples[0][0][:, :0], *samples[0][1:])  # wrong token count: fails in the thread
    with pytest.raises(MimicError, match="sample 0: states"):
        background.submit(*bad)  # returns at once: the error comes with a later submit or close
        for i in range(1, 6):
            background.submit(i, *samples[i])
            time.sleep(0.05)
        background.close()
    assert writer.done == set(), "after a failed write, queued ones are dropped"
    writer.close()


def test_async_writer_keeps_finished_samples_when_the_caller_fails(tmp_path):
    layout = small_layout()
    samples = make_samples(layout, 8)
    writer = CacheWriter.open(tmp_path / "c", FINGERPRINT, layout, *counts(samples))
    with pytest.raises(KeyboardInterrupt), AsyncWriter(writer) as background:
        background.submit_many([(i, *samples[i]) for i in range(5)])
        raise KeyboardInterrupt  # Ctrl-C in the teacher loop: staged samples are still written and marked
    assert writer.done == set(range(5)) and writer.missing() == [5, 6, 7]


@pytest.mark.parametrize("outliers", [0, 8])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_refuses_non_finite_states(tmp_path, outliers, bad):
    layout = small_layout(codec="int8", int8_outliers=outliers, topk=0)
    samples = make_samples(layout, 1)
    states = samples[0][0].clone()
    states[1, 0, 5:17] = bad  # more bad values than outliers: some land in the int8 block
    writer = CacheWriter.open(tmp_path / "c", FINGERPRINT, layout, *counts(samples))
    with pytest.raises(MimicError, match="sample 0: states hold inf/NaN"):
        writer.write(0, states)
    assert writer.missing() == [0]


JOB = textwrap.dedent(
    """
    import os, shutil, signal, sys, time
    from pathlib import Path
    import torch
    from pipeline.cache.store import Layout
    from pipeline.cache.writer import CacheWriter

    N = 14
    LAYOUT = Layout(num_layers=4, hidden_size=128, dtype="bfloat16", topk=4, chunk_tokens=16, shard_chunks=4)
    FINGERPRINT = {"model_config_hash": "abc", "seed": 0}
    ORDER = [3, 0, 1, 2, 7, 4, 5, 6, 13, 8, 9, 12, 10, 11]  # partly out of order

    def counts():
        g = torch.Generator().manual_seed(123)
        return torch.randint(5, 60, (N,), generator=g).tolist(), torch.randint(1, 4, (N,), generator=g).tolist()

    def sample(i):
        tokens, answers = counts()
        g = torch.Generator().manual_seed(i)
        states = torch.randn(4, tokens[i], 128, generator=g).to(torch.bfloat16)
        return states, torch.randn(answers[i], 4, generator=g), torch.randint(0, 50000, (answers[i], 4), generator=g)

    def run(path, pause=0.0, staged=False):
        # staged: pairs of samples go through write_many(flush=False), which leaves samples half written
        print("creating", flush=True)
        writer = CacheWriter.open(path, FINGERPRINT, LAYOUT, *counts())
        todo = [i for i in ORDER if i not in writer.done]
        for pair in [todo[j : j + 2] for j in range(0, len(todo), 2)] if staged else [[i] for i in todo]:
            print("begin", pair, flush=True)
            writer.write_many([(i, *sample(i)) for i in pair], flush=not staged)
            print("end", pair, flush=True)
            time.sleep(pause)
        writer.finish()
        print("done", flush=True)

    def kill(path, trigger, count, delay):
        # Fork a process running the job (forking saves re-importing torch) and SIGKILL it `delay` s
        # after its `count`-th output line starting with `trigger`; trigger "" kills it at once.
        sys.stdout.flush()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.dup2(write, 1)
            run(path, pause=0.01, staged=STAGED)
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as lines:
            seen = 0
            while trigger and seen < count:
                line = lines.readline()
                if not line:
                    sys.exit(f"the job ended before its {count}-th {trigger!r} line")
                seen += line.startswith(trigger)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            sys.exit(f"the job was not killed: status {status}")

    def put_in_two_halves(path, value, exclusive=False):
        # zarr's atomic file write, paused half-way so that a kill at "put" lands mid-file.
        path.parent.mkdir(parents=True, exist_ok=True)
        view = memoryview(value.as_buffer_like()).cast("B")
        with local._atomic_write(path, "wb", exclusive=exclusive) as f:
            f.write(view[: len(view) // 2])
            f.flush()
            print("put", path, flush=True)
            time.sleep(0.003)
            f.write(view[len(view) // 2 :])
        return len(view)

    def shard_in_two_halves(path, pieces):
        # ShardWriter's own atomic write (it bypasses zarr's store), paused half-way likewise.
        def halves():
            for k, piece in enumerate(pieces):
                if k == len(pieces) // 2:
                    print("put", path, flush=True)
                    time.sleep(0.003)
                yield piece

        write_atomic(path, halves())

    if __name__ == "__main__":
        # Driver: kill one job after another on the same store, keeping a copy of the store after each kill.
        import zarr.storage._local as local
        import pipeline.cache.shards as shards
        local._put = put_in_two_halves
        write_atomic, shards._write_atomic = shards._write_atomic, shard_in_two_halves
        path, copies, STAGED = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "staged"
        for k, spec in enumerate(sys.argv[4:]):
            trigger, count, delay = spec.split(":")
            kill(path, trigger, int(count), float(delay))
            print("half-created" if list(path.parent.glob(f".{path.name}.creating-*")) else "", flush=True)
            if path.exists():
                shutil.copytree(path, copies / str(k))
    """
)
# trigger:count:delay. "put" lines come half-way through a file write: the first kills land mid-creation
# (~10 files), the later ones mid-shard and mid-marker writes; "begin"/"end" bracket a sample's write.

KILLS = [":0:0", "put:2:0", "put:6:0", "put:9:0", "begin:1:0", "put:1:0", "put:2:0", "put:3:0", "end:1:0"]

KILLS += [f"begin:{1 + k % 2}:{delay}" for k, delay in enumerate((0.002, 0.006, 0.01))] + [
    "put:5:0",
    "put:4:0.001",
    "end:3:0",  # later kills: staged runs mark samples only once a shard fills
    "put:12:0",
    "put:9:0",
]


@pytest.mark.parametrize("mode", ["direct", "staged"])
def test_sigkill_at_any_moment_then_rerun_equals_uninterrupted_run(tmp_path, mode):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    spec = importlib.util.spec_from_file_location("cache_job", script)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    job.run(tmp_path / "reference")
    reference = CacheReader.open(tmp_path / "reference")

    path, copies = tmp_path / "killed", tmp_path / "copies"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.run(
        [sys.executable, str(script), str(path), str(copies), mode, *KILLS],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert driver.returncode == 0, driver.stderr[-2000:]
    assert "half-created" in driver.stdout, "no kill landed while the store was being created"
    assert list(copies.rglob("*.partial")), "no kill landed in the middle of a file write"
    marked_after_kill, half_written = [], 0
    for copy in sorted(
        copies.iterdir(), key=lambda p: int(p.name)
    ):  # every sample marked so far is exactly right
        store = cache_store._Store(copy, "r")
        marked = np.flatnonzero(store.marks[:] >= 0).tolist()
        marked_after_kill.append(len(marked))
        states, offsets = store.arrays["states"][:], store.offsets["tokens"]
        for i in set(range(len(store))) - set(marked):  # unmarked, some of its token rows in place
            written = np.abs(states[:, offsets[i] : offsets[i + 1]].astype(np.float32)).sum(axis=(0, 2)) > 0
            half_written += bool(written.any() and not written.all())
        assert not store.complete
        for i, got in zip(marked, CacheReader(store, verify=True).read_many(marked), strict=True):
            assert all(torch.equal(u, v) for u, v in zip(got, reference.read(i), strict=True)), (
                f"{copy}: sample {i}"
            )
    assert marked_after_kill[-1] > 0 and marked_after_kill == sorted(marked_after_kill)
    if mode == "staged":
        assert half_written, "no kill left a sample half written"
        assert list(copies.rglob("*.shard-*.partial")), "no kill landed in a ShardWriter write"

    job.run(path, staged=mode == "staged")
    assert_same_store(path, tmp_path / "reference")
    assert not list(tmp_path.glob(".killed.creating-*"))


def test_a_distributed_store_is_held_from_its_creation_until_the_parts_close(tmp_path):
    # rank 0 turns its exclusive lock into a shared one that its part keeps: no window in which another run
    # (one process, or another distributed run's rank 0) could take the store before the ranks open their parts
    from pipeline.cache.writer import Part

    layout = small_layout()
    samples = make_samples(layout, 6)
    path, args = tmp_path / "c", (FINGERPRINT, layout, *counts(samples))
    missing, lock = CacheWriter.prepare_parts(path, *args, size=2)
    assert missing == list(range(6)) and lock is not None
    others = (lambda: CacheWriter.open(path, *args), lambda: CacheWriter.prepare_parts(path, *args, size=2))
    for other in others:
        with pytest.raises(MimicError, match="being written by another process"):
            other()
    parts = [
        CacheWriter.open(path, *args, part=Part(0, 2, 0, 3), lock=lock),
        CacheWriter.open(path, *args, part=Part(1, 2, 3, 6)),
    ]
    for writer in parts:
        for i in range(writer.part.first, writer.part.stop):
            writer.write(i, *samples[i])
    for other in others:
        with pytest.raises(MimicError, match="being written by another process"):
            other()
    for writer in parts:
        writer.write_held()
    for writer in parts:
        writer.close()
    CacheWriter.finish_parts(path)
    write_store(tmp_path / "one", layout, samples)
    assert_same_store(path, tmp_path / "one")
    assert CacheWriter.prepare_parts(path, *args, size=2) == ([], None)  # complete: nothing held
