"""Fork server for the tests' training launches: ranks forked from one pre-imported process.

``python -m tests.parallel.rank_server`` imports torch, megatron-core and sbtrain once (~8 s of
CPU per process on the 2-core CI machine: more than a tiny run's whole training), then serves
launches read from stdin, one JSON line each::

    {"nproc", "entry", "args", "env", "cwd", "stdout", "stderr", "timeout"}

and forks ``nproc`` ranks per launch, each with torchrun's rendezvous variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: a fresh port per launch) on top of ``env``,
running ``entry`` (``["-m", MODULE]`` or ``[SCRIPT]``) with ``args`` as ``python -u`` would,
every rank's output appended to the launch's two files. Like torchrun, the first rank to fail
ends the others. One JSON line per launch comes back: ``{"returncode", "seconds"}``
(returncode: 0, the first failing rank's exit code, or -9 past ``timeout``).

The harness (``tests/parallel/harness.py``: ``launch``, ``run``, ``run_many``) starts one server
per test session. Tests of torchrun's own behaviour (the watchdog's exit code, SIGTERM to the
launcher, orphaned workers) and the documented commands launch real torchrun.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import runpy
import signal
import socket
import sys
import time
import traceback

from tests.forked_child import exit_code, flush_and_exit, redirect_stdio

# What a rank imports before its first step, imported here once before any fork.
SERVER_IMPORTS = (
    "torch.distributed",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "parallel.groups",
    "sbtrain.train",
    "sbtrain.trainer",
    "sbtrain.trainer_setup",
    "sbtrain.checkpoint",
)
KILL_GRACE_S = 2.0
"""How long the other ranks get after one failed (they may sit in a collective forever)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(launch: dict, rank: int, port: int) -> None:
    """In the forked child: become rank ``rank`` of the launch, run its entry, never return."""
    code = 1
    try:
        redirect_stdio(launch["stdout"], launch["stderr"], append=True)
        # python -u: every write reaches the file at once, in the order the ranks made them
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        nproc = launch["nproc"]
        os.environ.clear()
        os.environ.update(launch["env"])
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                          LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        os.chdir(launch["cwd"])
        entry, args = launch["entry"], launch["args"]
        if entry[0] == "-m":
            sys.argv = [entry[1], *args]
            runpy.run_module(entry[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(entry[0])
            sys.argv = [script, *args]
            sys.path.insert(0, os.path.dirname(script))
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException:  # noqa: BLE001 - reported like python reports an uncaught error
        traceback.print_exc()
    finally:
        flush_and_exit(code)  # stops the processes the rank started (forked_child.py)


def _wait(pids: list[int], timeout: float) -> int:
    """Reap every rank; the first failure (or the timeout) ends the others."""
    start, returncode, failed_at = time.monotonic(), 0, None
    running = set(pids)
    while running:
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                if code and not returncode:
                    returncode, failed_at = code, time.monotonic()
        now = time.monotonic()
        over = now - start > timeout
        if running and (over or (failed_at is not None and now - failed_at > KILL_GRACE_S)):
            returncode = -9 if over else returncode
            for pid in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    return returncode


def serve() -> None:
    for name in SERVER_IMPORTS:
        importlib.import_module(name)
    protocol = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        launch = json.loads(line)
        start, port = time.monotonic(), _free_port()
        protocol.flush()
        sys.stderr.flush()
        pids = []
        for rank in range(launch["nproc"]):
            pid = os.fork()
            if pid == 0:
                _rank_main(launch, rank, port)
            pids.append(pid)
        returncode = _wait(pids, launch["timeout"])
        protocol.write(json.dumps({"returncode": returncode,
                                   "seconds": time.monotonic() - start}) + "\n")
        protocol.flush()


class RankServer:
    """The client side: one server process, launches one at a time."""

    def __init__(self, env: dict, cwd: str, log: str) -> None:
        import subprocess

        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.parallel.rank_server"],
                                      cwd=cwd, env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True,
                                      bufsize=1)

    def launch(self, nproc: int, entry: list[str], args: list[str], env: dict, cwd: str,
               out_dir: str, timeout: float) -> tuple[int, str, str]:
        """(returncode, stdout, stderr) of ``nproc`` ranks running ``entry args``."""
        fd, base = _fresh_base(out_dir)
        outputs = {"stdout": base + ".out", "stderr": base + ".err"}
        os.close(fd)
        request = {"nproc": nproc, "entry": entry, "args": args, "env": env, "cwd": cwd,
                   "timeout": timeout, **outputs}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            self._log.flush()
            raise RuntimeError(f"the rank server exited ({self._proc.wait()}): "
                               f"{open(self._log.name).read()[-4000:]}")
        texts = []
        for path in outputs.values():
            with open(path) as f:
                texts.append(f.read())
        return json.loads(reply)["returncode"], texts[0], texts[1]

    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a stuck server is killed, never waited on forever
            self._proc.kill()
        self._log.close()


def _fresh_base(out_dir: str) -> tuple[int, str]:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="launch", dir=out_dir)
    return fd, path


if __name__ == "__main__":
    serve()
