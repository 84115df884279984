#!/usr/bin/env python3
"""Run `tensorbake run` on a Ray cluster: one Ray task per worker, retried when it dies.

    python deploy/ray/launch.py MANIFEST --workers N [--address ADDR] [--output STORE]
        [--bin PATH] [--retries K] [--gpus-per-worker G] [--cpus-per-worker C]
        [--run-dir DIR] [-- EXTRA RUN ARGS...]

Task i runs `tensorbake run MANIFEST --rank i --world N` (shard j belongs to rank
j % N). Every worker writes its own parts of the one store, which must be reachable
from every node (a shared file system or s3://). A worker that fails (a non-zero exit,
a kill, its node lost) is retried by Ray up to --retries times; the retry is the same
command, so it keeps the parts already committed and redoes only the rest. When all
tasks have ended the launcher prints the merged report, one JSON object on stdout
(samples, skips by reason, failed shards, attempts per worker) and a table on stderr;
it exits 0 when every worker finished its shards, 1 otherwise (run it again: it does
only what is left), 2 on a usage error.

The binary is --bin, else `tensorbake` on each node's PATH. The MANIFEST and a local
--output are made absolute from the launcher's working directory and used so on
every node: put them on shared storage (or the store on s3://). --run-dir, when given, gets per attempt `rank-<i>.attempt-<a>.log` (the run's
stderr) and `.pid` (while it runs); on a multi-node cluster put it on shared storage.

Linux only: the tensorbake child is tied to its Ray worker (PR_SET_PDEATHSIG), so a
worker that dies never leaves a run behind that would write beside its own retry.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


class WorkerFailed(Exception):
    """A `tensorbake run` attempt that did not finish its shards (Ray retries it)."""

    def __init__(self, rank: int, attempt: int, code: int, tail: str, report: dict | None):
        self.rank, self.attempt, self.code, self.tail, self.report = rank, attempt, code, tail, report
        how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
        super().__init__(f"rank {rank} attempt {attempt}: tensorbake run {how}\n{tail}")

    def __reduce__(self):
        return (WorkerFailed, (self.rank, self.attempt, self.code, self.tail, self.report))


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the Ray worker that started it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Attempts:
    """Counts the attempts of each rank (a Ray actor: tasks on any node share it)."""

    def __init__(self) -> None:
        self.n: dict[int, int] = {}

    def next(self, rank: int) -> int:
        a = self.n.get(rank, 0)
        self.n[rank] = a + 1
        return a


def run_worker(
    rank: int, world: int, manifest: str, output: str | None, binary: str,
    extra: list[str], run_dir: str | None, attempts,
) -> dict:
    """One attempt of one rank (the body of the Ray task). Returns the JSON report."""
    import ray

    attempt = ray.get(attempts.next.remote(rank))
    rd = Path(run_dir) if run_dir else None
    if rd is not None:
        rd.mkdir(parents=True, exist_ok=True)
    cmd = [binary, "run", manifest, "--rank", str(rank), "--world", str(world)]
    if output:
        cmd += ["--output", output]
    cmd += extra
    log_path = rd / f"rank-{rank}.attempt-{attempt}.log" if rd else None
    log = open(log_path, "w+b") if log_path else subprocess.PIPE
    try:
        child = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, preexec_fn=_die_with_parent,
        )
        pid_path = rd / f"rank-{rank}.attempt-{attempt}.pid" if rd else None
        if pid_path:
            pid_path.write_text(f"{child.pid}\n")
        out, err = child.communicate()
        if pid_path:
            pid_path.unlink(missing_ok=True)
        if log_path:
            log.seek(0)
            err = log.read()
    finally:
        if log_path:
            log.close()
    tail = "\n".join(err.decode(errors="replace").splitlines()[-20:])
    try:
        report = json.loads(out) if out.strip() else None
    except json.JSONDecodeError:
        report = None
    if child.returncode != 0 or report is None:
        raise WorkerFailed(rank, attempt, child.returncode, tail, report)
    report["attempt"] = attempt
    return report


def merge(results: dict[int, dict]) -> dict:
    """The merged report: per worker and in total."""
    workers, total = [], {"samples_read": 0, "samples_written": 0, "skipped": {},
                          "parts_committed": 0, "failed_shards": 0}
    for rank in sorted(results):
        r = results[rank]
        report = r.get("report") or {}
        samples = report.get("samples", {})
        failed = [f["shard"] for f in report.get("failed_shards", [])]
        w = {
            "rank": rank,
            "ok": r["ok"],
            "attempts": r["attempts"],
            "samples_read": samples.get("read", 0),
            "samples_written": samples.get("written", 0),
            "skipped": samples.get("skipped", {}),
            "parts_committed": report.get("shards", {}).get("committed", 0),
            "already_committed": report.get("shards", {}).get("already_committed", 0),
            "failed_shards": failed,
            "error": r.get("error"),
        }
        workers.append(w)
        total["samples_read"] += w["samples_read"]
        total["samples_written"] += w["samples_written"]
        total["parts_committed"] += w["parts_committed"]
        total["failed_shards"] += len(failed)
        for reason, n in w["skipped"].items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + n
    return {"ok": all(w["ok"] for w in workers), "workers": workers, "total": total}


def table(merged: dict) -> str:
    rows = ["rank  ok   attempts  read  written  parts  skipped  failed shards"]
    for w in merged["workers"]:
        rows.append(
            f"{w['rank']:>4}  {'yes' if w['ok'] else 'NO ':<3}  {w['attempts']:>8}  "
            f"{w['samples_read']:>4}  {w['samples_written']:>7}  {w['parts_committed']:>5}  "
            f"{sum(w['skipped'].values()):>7}  {', '.join(w['failed_shards']) or '-'}"
        )
    t = merged["total"]
    rows.append(
        f"total: {t['samples_written']} samples written in {t['parts_committed']} parts, "
        f"{sum(t['skipped'].values())} skipped {t['skipped'] or ''}, "
        f"{t['failed_shards']} failed shards"
    )
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch.py", description="tensorbake run as Ray tasks with retries")
    p.add_argument("manifest")
    p.add_argument("--workers", type=int, required=True, help="number of ranks (world)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--output", help="the store, overriding the manifest's")
    p.add_argument("--bin", default="tensorbake", help="the tensorbake binary (default: on PATH)")
    p.add_argument("--retries", type=int, default=3, help="retries per worker (default 3)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0)
    p.add_argument("--cpus-per-worker", type=float, default=8.0)
    p.add_argument("--run-dir", help="per-attempt logs and pid files")
    p.add_argument("extra", nargs="*", help="after --: more `tensorbake run` options")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error(f"--workers {a.workers}: needs at least 1")
    if a.retries < 0:
        p.error(f"--retries {a.retries}: cannot be negative")
    if not Path(a.manifest).is_file():
        p.error(f"manifest {a.manifest} not found")
    if os.sep in a.bin:
        if not os.access(a.bin, os.X_OK):
            p.error(f"--bin {a.bin}: not an executable file")
        a.bin = str(Path(a.bin).resolve())
    elif shutil.which(a.bin) is None and a.address is None and "RAY_ADDRESS" not in os.environ:
        p.error(f"--bin {a.bin}: not on PATH (a local Ray runs it here)")
    a.manifest = str(Path(a.manifest).resolve())
    # Ray tasks run in their own working directory: a relative store path is the
    # launcher's, made absolute (URLs such as s3://bucket/prefix are kept)
    if a.output and "://" not in a.output:
        a.output = str(Path(a.output).resolve())
    if a.run_dir:
        a.run_dir = str(Path(a.run_dir).resolve())
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    # stdout is the merged report alone: Ray's own messages (task retries, ...) go to
    # stderr with everything else
    sys.stdout.flush()
    report_fd = os.dup(1)
    os.dup2(2, 1)
    import ray  # imported late: --help and usage errors work without Ray

    ray.init(address=a.address, log_to_driver=False, include_dashboard=False)
    have = ray.cluster_resources()
    for name, per in (("GPU", a.gpus_per_worker), ("CPU", a.cpus_per_worker)):
        if per > have.get(name, 0):
            flag = f"--{name.lower()}s-per-worker"
            print(f"launch.py: error: each worker asks for {per:g} {name} ({flag}) but the "
                  f"cluster has {have.get(name, 0):g}", file=sys.stderr)
            return 2
    task = ray.remote(run_worker).options(
        num_gpus=a.gpus_per_worker, num_cpus=a.cpus_per_worker,
        max_retries=a.retries, retry_exceptions=True,
    )
    attempts = ray.remote(num_cpus=0)(Attempts).remote()
    started = time.monotonic()
    refs = {
        task.remote(i, a.workers, a.manifest, a.output, a.bin, a.extra, a.run_dir, attempts): i
        for i in range(a.workers)
    }
    results: dict[int, dict] = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            rank = refs[ref]
            try:
                report = ray.get(ref)
                results[rank] = {"ok": True, "attempts": report["attempt"] + 1, "report": report}
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(e.cause, WorkerFailed) else None
                results[rank] = {
                    "ok": False,
                    "attempts": (cause.attempt + 1) if cause else a.retries + 1,
                    "report": cause.report if cause else None,
                    "error": str(cause or e).splitlines()[0],
                }
            except ray.exceptions.RayError as e:  # the worker or its node died for good
                results[rank] = {"ok": False, "attempts": a.retries + 1, "report": None,
                                 "error": str(e).splitlines()[0]}
            r = results[rank]
            print(f"launch.py: rank {rank} {'done' if r['ok'] else 'FAILED'} after "
                  f"{r['attempts']} attempt(s)" + (f": {r['error']}" if not r["ok"] else ""),
                  file=sys.stderr)
    merged = merge(results)
    merged["seconds"] = round(time.monotonic() - started, 3)
    print(table(merged), file=sys.stderr)
    sys.stdout.flush()
    with os.fdopen(report_fd, "w") as out:
        out.write(json.dumps(merged, indent=2) + "\n")
    if not merged["ok"]:
        print("launch.py: some workers did not finish; run the same command again to do "
              "what is left", file=sys.stderr)
    return 0 if merged["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
