"""Parquet warehouse under kill -9: a child commits batches in a loop and is SIGKILLed at
random moments and at every step of the commit protocol; after each kill the dataset,
once reopened (healed), must be exactly the state before the interrupted batch or the
state after it — never a mix, never duplicate keys.

Run as a script (``python test_parquet_crash.py child ...``) it is the child.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_parquet import call_uuid, commit_spec, fabricate, stage_count

from pipeline import schema
from pipeline.load.parquet import STAGING, ParquetWarehouse

N_CALLS = 40
RUN_ID = "crash-run"
PROMPT = 1500
Spec = list[tuple[int, str, int]]
#: Crash points inside a commit (see pipeline.load.parquet._checkpoint); "rename" fires
#: once per file moved into place, so it dies in the middle of applying a journal.
#: None: a plain SIGKILL at a random moment (often while files are being written).
STEPS = ["staged", "journaled", "rename", "applied", None]
#: How many times a step may pass before the child dies there (spreads the kills
#: over different batches and, for "rename", different files of a batch).
MAX_PASSES = {"staged": 12, "journaled": 12, "rename": 150, "applied": 12}


# ----------------------------------------------------------------------------- child


def child(out: str, specs_file: str, done_file: str, crash: str) -> None:
    from pipeline.load import parquet

    if crash:
        step, _, nth = crash.partition(":")
        countdown = {"left": int(nth or 1)}

        def hook(name: str) -> None:
            if name == step:
                countdown["left"] -= 1
                if countdown["left"] <= 0:
                    os.kill(os.getpid(), signal.SIGKILL)

        parquet.CRASH_HOOK = hook
    specs = json.loads(Path(specs_file).read_text())
    with ParquetWarehouse(Path(out), wait_for_lock=True) as wh, open(done_file, "a") as done:
        print("ready", flush=True)
        for i, spec in enumerate(specs):
            commit_spec(wh, [tuple(x) for x in spec], run_id=RUN_ID, prompt_bytes=PROMPT)
            done.write(f"{i}\n")
            done.flush()


# ----------------------------------------------------------------------------- model


@dataclass
class Model:
    """What the dataset must hold after a sequence of committed batches."""

    version: dict[int, int] = field(default_factory=dict)  # call → version whose rows are held
    status: dict[int, str] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    stages: dict[int, int | None] = field(default_factory=dict)

    def apply(self, spec: Spec) -> Model:
        new = Model(dict(self.version), dict(self.status), dict(self.attempts), dict(self.stages))
        for c, status, v in spec:
            new.status[c] = status
            new.attempts[c] = new.attempts.get(c, 0) + 1
            if status == "loaded":
                new.version[c], new.stages[c] = v, stage_count(c, v)
            elif status == "not_found":
                new.version.pop(c, None)
                new.stages[c] = 0
            else:
                new.stages.setdefault(c, None)
        return new


def random_spec(rng: random.Random) -> Spec:
    calls = rng.sample(range(N_CALLS), rng.randint(3, 10))
    return [(c, rng.choices(["loaded", "not_found", "failed"], [7, 1.5, 1.5])[0], rng.randrange(6)) for c in calls]


def read_table(out: Path, table: schema.Table) -> pa.Table:
    folder = out / table.name
    files = sorted(str(p) for p in folder.rglob("*.parquet")) if folder.exists() else []
    if not files:
        return table.arrow_schema.empty_table()
    data = ds.dataset(files, format="parquet", partitioning=ds.partitioning(flavor="hive"), partition_base_dir=str(folder))
    got = data.to_table()
    if table.partition_by:
        got = got.drop_columns([table.partition_by])
    return got.select(table.column_names).cast(table.arrow_schema)


def sort(t: pa.Table, table: schema.Table) -> pa.Table:
    return t.sort_by([(k, "ascending") for k in table.primary_key])


def matches(out: Path, model: Model) -> bool:
    """Data tables equal the model's versions row for row; etl_calls agrees."""
    expected = fabricate(sorted(model.version.items()), RUN_ID, PROMPT)
    for table in schema.DATA_TABLES:
        if not sort(read_table(out, table), table).equals(sort(expected[table.name], table)):
            return False
    calls = read_table(out, schema.ETL_CALLS).to_pydict()
    got = {
        cid: (status, attempts, stages)
        for cid, status, attempts, stages in zip(calls["call_id"], calls["status"], calls["attempts"], calls["stage_count"], strict=True)
    }
    want = {call_uuid(c): (model.status[c], model.attempts[c], model.stages[c]) for c in model.status}
    return got == want


def assert_unique(out: Path) -> None:
    for table in schema.TABLES.values():
        rows = read_table(out, table)
        keys = rows.select(list(table.primary_key)).to_pylist()
        assert len({tuple(k.values()) for k in keys}) == rows.num_rows, f"{table.name}: duplicate keys"


# ----------------------------------------------------------------------------- parent


def run_child(out: Path, work: Path, specs: Sequence[Spec], crash: str | None, rng: random.Random) -> int:
    """Start the child, let it commit, kill it; return how many batches it finished."""
    specs_file, done_file = work / "specs.json", work / "done.log"
    specs_file.write_text(json.dumps(specs))
    done_file.write_text("")
    proc = subprocess.Popen(
        [sys.executable, __file__, "child", str(out), str(specs_file), str(done_file), crash or ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready": the warehouse is open (and healed)
        if crash is None:
            time.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode in (0, -signal.SIGKILL), stderr
    return len(done_file.read_text().split())


def crash_loop(tmp_path: Path, rounds: int, seed: int) -> None:
    """Exactly ``rounds`` crashes (never cut by a time budget), then a clean commit."""
    rng = random.Random(seed)
    out = tmp_path / "out"
    model = Model()
    for n in range(rounds):
        specs = [random_spec(rng) for _ in range(25)]
        step = STEPS[n % len(STEPS)]
        crash = f"{step}:{rng.randint(1, MAX_PASSES[step])}" if step else None
        done = run_child(out, tmp_path, specs, crash, rng)
        before = model
        for spec in specs[:done]:
            before = before.apply(spec)
        after = before.apply(specs[done]) if done < len(specs) else None
        with ParquetWarehouse(out):  # heals: rolls a journal forward or drops staging
            pass
        assert not [p.name for p in (out / STAGING).iterdir() if p.name != "lock"]
        assert_unique(out)
        if matches(out, before):
            model = before
        else:
            assert after is not None and matches(out, after), f"round {n} ({crash}): neither before nor after batch {done}"
            model = after
    # A final clean commit over every call gives exactly the expected dataset.
    final: Spec = [(c, "loaded", 9) for c in range(N_CALLS)]
    with ParquetWarehouse(out) as wh:
        commit_spec(wh, final, run_id=RUN_ID, prompt_bytes=PROMPT)
    model = model.apply(final)
    assert matches(out, model)
    assert_unique(out)


def test_kill_at_every_commit_step(tmp_path: Path) -> None:
    crash_loop(tmp_path, rounds=len(STEPS), seed=1)  # one crash at each step


@pytest.mark.slow
def test_kill_at_random_moments_and_every_commit_step(tmp_path: Path) -> None:
    crash_loop(tmp_path, rounds=2 * len(STEPS), seed=1)  # every commit step twice


@pytest.mark.slow
def test_kill_many_times(tmp_path: Path) -> None:
    crash_loop(tmp_path, rounds=150, seed=2)


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(*sys.argv[2:6])
