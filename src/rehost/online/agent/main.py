"""The agent's command line: prechecks, then prepare, transfer and finalize, resumable.

Runs on the source server (Python 3.6+, standard library only), from the zipapp or as
`rehost agent`. Everything it writes lives beside its config file (log/ with rotation,
state/ with the stage checkpoint), so deleting that folder removes every trace. The last
line and the exit status say what happened and what to do next.
"""

import argparse
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional

from rehost.online.agent import config as agent_config
from rehost.online.agent.config import Config
from rehost.online.agent.precheck import (
    Check,
    describe_error,
    destination_layout,
    failures,
    human,
    migrated_mounts,
    plan_disks,
    require_ok,
    run_prechecks,
)
from rehost.online.protocol import AgentError, hold_lock, source_identity

STAGES = ("prepare", "transfer", "finalize", "all")
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
CHECK_RETRY_SECONDS = 5.0
PROGRESS_SECONDS = 30.0
"""How often a transfer says how far it is."""
FINAL_REPEATS = 2
"""Final passes run again while files change during one, before the finalize gives up."""
RESUME = "run the same command again to resume"
log = logging.getLogger("rehost.online")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rehost-agent",
        description="Migrate this running Linux server to a destination running "
        "`rehost receive`. Logs and state are kept beside the config file.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the agent's JSON config")
    p.add_argument(
        "--check", action="store_true", help="run every precheck, change nothing, and exit"
    )
    p.add_argument(
        "--stage",
        choices=STAGES,
        help="prepare the destination disks, transfer (repeatable: incremental), finalize "
        "(after stopping your services), or all three",
    )
    p.add_argument(
        "--source-root",
        default="/",
        metavar="DIR",
        help="the root of the system to migrate (default /)",
    )
    return p


class Agent:
    """One run: the config, the source layout, the receiver client and the checkpoint."""

    def __init__(self, config: Config, source_root: str, retry_seconds: float = 300.0) -> None:
        self.config = config
        self.retry_seconds = retry_seconds
        self.source_root = os.path.abspath(source_root)
        self.state_path = os.path.join(config.base_dir, "state", "agent.json")
        self._layout = None  # type: Optional[Dict[str, Any]]
        self._client = None  # type: Any

    @property
    def layout(self) -> Dict[str, Any]:
        if self._layout is None:
            from rehost.online.agent.layout import discover

            self._layout = discover(self.source_root)
            log.info("layout: %s", json.dumps(self._layout, sort_keys=True))
        return self._layout

    @property
    def client(self) -> Any:
        if self._client is None:
            from rehost.online.agent.client import ReceiverClient

            c = self.config
            self._client = ReceiverClient(
                c.address,
                c.token,
                c.fingerprint,
                proxy=c.proxy,
                limit_kbps=c.bandwidth_kbps,
                retry_seconds=self.retry_seconds,
                source=source_identity(self.source_root),
            )
        return self._client

    # -- checkpoint ---------------------------------------------------------------------------

    def load_state(self) -> Dict[str, Any]:
        try:
            with open(self.state_path, encoding="utf-8") as f:
                state = json.load(f)
            if isinstance(state, dict):
                return state
        except (OSError, ValueError):
            pass
        return {"completed": [], "passes": 0}

    def save_state(self, state: Dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        state["updated"] = time.time()
        tmp = self.state_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def mark(self, stage: str, **extra: Any) -> None:
        state = self.load_state()
        if stage not in state["completed"]:
            state["completed"].append(stage)
        state.update(extra)
        self.save_state(state)

    def completed(self, stage: str) -> bool:
        return stage in self.load_state()["completed"]

    # -- stages -------------------------------------------------------------------------------

    def prechecks(self) -> List[Check]:
        checks = run_prechecks(self.config, self.layout, self.client, self.source_root)
        for c in checks:
            log.info("precheck %s", c.line())
        return checks

    def prepare(self) -> None:
        checks = self.prechecks()
        for c in checks:
            say(c.line())
        require_ok(checks)
        plan, _ = plan_disks(self.config, self.layout)
        body = destination_layout(self.layout, plan)
        say("preparing the destination disks ({})".format(", ".join(sorted(body["disks"]))))
        response = self.client.post_json("/v1/prepare", body)
        log.info("prepare: %s", json.dumps(response, sort_keys=True))
        self.mark("prepare")
        say("prepared: {} filesystems".format(len(response.get("filesystems") or {})))

    def sync_all(self, what: str, pass_no: int) -> int:
        """One pass over every migrated filesystem; the entries that changed during it."""
        from rehost.online.agent.transfer import sync_filesystem

        plan, _ = plan_disks(self.config, self.layout)
        excludes = agent_config.effective_excludes(
            self.config, self.source_root, agent_dirs(self.config)
        )
        for swap in self.layout.get("swap") or []:
            if swap.get("file") and swap["file"] not in excludes:
                excludes.append(swap["file"])
        log.info("excludes: %s", excludes)
        unreadable = changed = 0
        for m in migrated_mounts(self.layout, plan):
            path = m.get("path") or os.path.join(self.source_root, m["mount"].lstrip("/"))
            say("{} {}: {} ({}) from {}".format(what, pass_no, m["mount"], m["fs_id"], path))
            started = time.time()
            # the first pass sends about what the filesystem holds; later ones, what changed
            with _Progress(self.client, m["mount"], int(m.get("used") or 0) if pass_no == 1 else 0):
                result = sync_filesystem(
                    self.client,
                    m["fs_id"],
                    path,
                    agent_config.excludes_for_mount(excludes, m["mount"]),
                    compression=self.config.compression,
                    log=lambda level, message: log.log(level, "%s", message),
                    pass_no=pass_no,
                )
            log.info("%s %s: %s", what, m["fs_id"], json.dumps(result, sort_keys=True))
            say(
                "{} {} done in {:.1f} s: {}".format(
                    what, m["mount"], time.time() - started, _summary(result)
                )
            )
            unreadable += int(result.get("unreadable", 0))
            changed += int(result.get("changed", 0))
        if unreadable:  # the stage is not done: "ready to boot" must not hide missing files
            raise AgentError(
                "SOURCE_UNREADABLE",
                f"{unreadable} files could not be read on the source and were not sent "
                "(each is named in log/agent.log)",
                "repair or restore them, or add them to Excludes, then run this stage again",
            )
        return changed

    def transfer(self) -> None:
        passes = int(self.load_state().get("passes", 0)) + 1
        self.sync_all("transfer", passes)
        self.mark("transfer", passes=passes)

    def finalize(self) -> None:
        passes = int(self.load_state().get("passes", 0)) + 1
        changed = self.sync_all("final pass", passes)
        for _ in range(FINAL_REPEATS):
            if not changed:
                break
            say(f"{changed} files changed during the final pass; running it again")
            passes += 1
            changed = self.sync_all("final pass", passes)
        if changed:  # "ready to boot" must not come with a file the receiver rejected
            raise AgentError(
                "SOURCE_CHANGING",
                f"{changed} files kept changing during the final pass (each is named in "
                "log/agent.log)",
                "stop the services that write them (or add what may differ, such as their "
                "scratch files, to Excludes), then run --stage finalize again",
            )
        state = self.load_state()
        state["passes"] = passes
        self.save_state(state)
        response = self.client.post_json("/v1/finalize", {})
        log.info("finalize: %s", json.dumps(response, sort_keys=True))
        fixups = response.get("fixups")
        if isinstance(fixups, dict):
            say(
                "boot fixups ({}): {} changes, {} commands (each in log/agent.log)".format(
                    fixups.get("distro") or "?",
                    len(fixups.get("changes") or []),
                    len(fixups.get("commands") or []),
                )
            )
        self.mark("finalize")


def _summary(result: Any) -> str:
    if isinstance(result, dict):
        return ", ".join(
            f"{k} {v}" for k, v in sorted(result.items()) if isinstance(v, (int, float, str))
        )
    return str(result)


def agent_dirs(config: Config) -> List[str]:
    """The agent's own folders, excluded from the migration: the config's and the zipapp's."""
    dirs = [config.base_dir]
    path = os.path.abspath(__file__)
    while path != os.path.dirname(path):
        if os.path.isfile(path):  # a component of __file__ that is a file: the zipapp
            if os.path.dirname(path) not in dirs:
                dirs.append(os.path.dirname(path))
            break
        path = os.path.dirname(path)
    return dirs


class _Progress:
    """A line every PROGRESS_SECONDS while a filesystem is sent: a pass over hundreds of GB
    takes hours, and silence at the console looks like a hang."""

    def __init__(self, client: Any, mount: str, total: int) -> None:
        self.client = client
        self.mount = mount
        self.total = total  # bytes expected, 0 if unknown
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self) -> "_Progress":
        self.base, self.started = self.client.payload_bytes, time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stopped.wait(PROGRESS_SECONDS):
            say(self.line(self.client.payload_bytes - self.base, time.monotonic() - self.started))

    def line(self, sent: int, elapsed: float) -> str:
        rate = sent / elapsed if elapsed > 0 else 0.0
        text = f"  {self.mount}: {human(sent)} sent"
        if self.total and sent < self.total:
            text += f" of ~{human(self.total)} ({sent * 100 // self.total}%)"
        text += f", {human(rate)}/s"
        if self.total and rate and sent < self.total:
            text += f", about {_duration((self.total - sent) / rate)} left"
        return text


def _duration(seconds: float) -> str:
    minutes = int(seconds) // 60
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes} min" if minutes else f"{int(seconds)} s"


def say(message: str) -> None:
    """A line for the person at the console, also in the log."""
    log.info("%s", message)
    show(message)


def show(line: str) -> None:
    """Print a line the console can take: Python 3.6 under LANG=C (cron, `ssh host cmd` on
    CentOS 7) has an ASCII stdout that raises on the last line's dash or a non-ASCII mount
    point, and a file name's undecodable bytes (surrogates) fail even on UTF-8."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(line.encode(encoding, "backslashreplace").decode(encoding), flush=True)


class _FileFormatter(logging.Formatter):
    """Escapes what UTF-8 cannot hold (undecodable bytes of file names, as surrogates): the
    log file would refuse them, and logging print a traceback on stderr."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).encode("utf-8", "backslashreplace").decode("utf-8")


def setup_logging(base_dir: str) -> List[logging.Handler]:
    """log/agent.log beside the config, rotated; warnings from the transfer also on stderr."""
    log_dir = os.path.join(base_dir, "log")
    os.makedirs(log_dir, exist_ok=True)
    file_handler = logging.handlers.RotatingFileHandler(
        os.path.join(log_dir, "agent.log"),
        maxBytes=LOG_MAX_BYTES,
        backupCount=LOG_BACKUPS,
        encoding="utf-8",
    )
    file_handler.setFormatter(_FileFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    # what the last line on stdout says anyway goes to the file only, not twice to the console
    console.addFilter(lambda record: not getattr(record, "last_line", False))
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handlers = [file_handler, console]  # type: List[logging.Handler]
    for h in handlers:
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False  # the agent's log is its own; nothing goes to the host's loggers
    return handlers


_LAST_LINE = {"last_line": True}


def _failed(exc: BaseException, resumable: bool) -> int:
    if isinstance(getattr(exc, "code", None), str):
        text = describe_error(exc)
        hint = getattr(exc, "hint", "") or ""
    else:
        log.error("unexpected failure:\n%s", traceback.format_exc(), extra=_LAST_LINE)
        text = f"AGENT_ERROR: {describe_error(exc)} (details in log/agent.log)"
        hint = "this is a bug in the agent; please report it with log/agent.log"
    log.error("failed: %s (hint: %s)", text, hint, extra=_LAST_LINE)
    parts = [p for p in (hint, RESUME if resumable else "") if p]
    show("failed: {}{}".format(text, " — " + "; ".join(parts) if parts else ""))
    return 1


def run(args: argparse.Namespace, config: Config) -> int:
    # --check answers quickly; the stages ride out a receiver restart or a network blip
    agent = Agent(config, args.source_root, CHECK_RETRY_SECONDS if args.check else 300.0)
    log.info(
        "agent started: stage=%s check=%s source_root=%s receiver=%s proxy=%s",
        args.stage,
        args.check,
        agent.source_root,
        config.address,
        config.proxy,
    )
    if args.check:
        checks = agent.prechecks()
        for c in checks:
            show(c.line())
        failed = failures(checks)
        if failed:
            say(f"check failed: {len(failed)} FAIL; fix them, then run --check again")
            return 1
        say("check passed; next: run --stage prepare (or --stage all on a quiet server)")
        return 0
    lock = _one_at_a_time(config.base_dir)
    try:
        return _run_stage(agent, args.stage)
    finally:
        os.close(lock)


def _one_at_a_time(base_dir: str) -> int:
    """Hold state/agent.lock while a stage runs. Two agents run from one folder (a cron job
    and a hand) took the receiver's filesystems from each other every 2 s, as the receiver
    hands a filesystem to the newer request, and wrote over each other's checkpoint."""
    path = os.path.join(base_dir, "state", "agent.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, holder = hold_lock(path)
    if fd < 0:
        raise AgentError(
            "AGENT_RUNNING",
            f"another agent is running from this folder (PID {holder})",
            "wait for it to end, or stop it; then run this command again",
        )
    return fd


def _run_stage(agent: "Agent", stage: str) -> int:
    if agent.completed("finalize"):
        if stage in ("finalize", "all"):
            say("already finalized: the destination is ready to boot")
            return 0
        raise AgentError(
            "ALREADY_FINALIZED",
            "this migration was finalized; the destination disks are unmounted",
            "boot the destination; to migrate again, start over with a fresh receiver "
            "and delete state/ beside the config",
        )
    if stage == "prepare" or (stage == "all" and not agent.completed("prepare")):
        agent.prepare()
        if stage == "prepare":
            say("prepare complete; next: run --stage transfer")
            return 0
    if stage in ("transfer", "all"):
        agent.transfer()
        if stage == "transfer":
            say(
                "transfer complete; run --stage transfer again to catch up, or stop your "
                "services and run --stage finalize"
            )
            return 0
    agent.finalize()
    say("ready to boot: the destination disks are synced and unmounted")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if not args.check and not args.stage:
        _parser().error("one of --check or --stage is required")
    base_dir = os.path.dirname(os.path.abspath(args.config))
    handlers = []  # type: List[logging.Handler]
    try:
        handlers = setup_logging(base_dir)
    except OSError as e:
        show(f"failed: cannot write log/ beside the config in {base_dir}: {e}")
        return 1
    try:
        config = agent_config.load(args.config)
        return run(args, config)
    except AgentError as e:
        return _failed(
            e,
            resumable=e.code
            not in ("CONFIG_INVALID", "PRECHECK_FAILED", "DESTINATION_TAKEN", "AGENT_RUNNING"),
        )
    except KeyboardInterrupt:
        log.warning("interrupted", extra=_LAST_LINE)
        show("interrupted; " + RESUME)
        return 130
    except Exception as e:  # every failure ends with the documented last line
        return _failed(e, resumable=True)
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
