"""torchrun with short, honest endings: the same arguments as `torchrun`, and

    python -m scripts.launch --standalone --nproc_per_node=8 -m scripts.base_train -- --config baseline

- SIGTERM / SIGINT to the launcher (a scheduler's preemption, Ctrl-C): torchrun passes the signal on to the
  workers, which finish their step, save a checkpoint and exit (nanochat.training.StopFlag); the launcher then
  says so in one line and exits 143 / 130, like a single process -- instead of torchrun's SignalException
  traceback and exit status 1.
- A worker that fails (e.g. a clear one-line `error: ...` from a bad flag): one line per failed rank with its exit
  status, and the launcher exits with that status -- instead of ~30 lines of ChildFailedError report.
- Multi-node: a node whose rendezvous store went away (the node hosting it was killed or is down): one line with
  the cause, exit 1 -- instead of a chained RendezvousConnectionError traceback.
- Multi-node, the store's node frozen (or gone) after this node's workers ended: torch elastic's agent would wait
  for the store forever (its keep-alive thread blocks in TCPStore.compareSet, with no timeout). A watchdog sees the
  workers gone and the store silent for $NANOCHAT_STORE_GRACE_S seconds (default STORE_GRACE_S) and ends the
  launcher in one line, exit 1. While the store answers (the other nodes still finishing: torch's exit barrier)
  it never fires.
speedrun.sh and the train_*.sh wrappers launch through it; plain `torchrun` works the same apart from the endings.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time

STORE_GRACE_S = 30.0  # how long the rendezvous store may stay silent after the workers ended (a live store answers
                      # in milliseconds; torch's own read timeout is 60 s)
STORE_PROBE_S = 5.0   # one probe's wait for the store's answer


def store_answers(host: str, port: int, wait_s: float = STORE_PROBE_S) -> bool:
    """Whether the c10d store at host:port answers within wait_s: a TCP connect (refused: the node is gone), then a
    store handshake in a thread (a frozen host's kernel accepts the connection, but nothing answers, and the
    client's own timeout does not bound the handshake)."""
    from torch.distributed import TCPStore
    try:
        socket.create_connection((host, port), timeout=wait_s).close()
    except OSError:
        return False
    answered = []

    def ask():
        try:
            store = TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=wait_s),
                             wait_for_workers=False)
            store.check(["nanochat_probe"])
            answered.append(True)
        except Exception:  # noqa: BLE001 -- any failure to answer is silence
            pass
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(wait_s)
    return bool(answered)


def live_workers() -> list:
    """This launcher's worker processes still running (torch elastic gives each a LOCAL_RANK)."""
    import psutil
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "LOCAL_RANK" in child.environ():
                out.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def watch_store(endpoint: str, grace_s: float, poll_s: float = 1.0):
    """The watchdog (a daemon thread): once the workers have run and all ended, probe the store; silent for grace_s
    in a row -> one line and exit 1."""
    host, _, port = endpoint.rpartition(":")
    seen_workers, silent_since = False, None
    while True:
        time.sleep(poll_s)
        if live_workers():
            seen_workers, silent_since = True, None
            continue
        if not seen_workers or store_answers(host, int(port)):
            silent_since = None
            continue
        silent_since = silent_since or time.monotonic()
        if time.monotonic() - silent_since >= grace_s:
            print(f"[launch] this node's workers have ended (their messages are above) and the rendezvous store at "
                  f"{endpoint} has not answered for {grace_s:g} s (its node is frozen or gone); exiting without "
                  f"the launcher's final handshake; continue with --resume", file=sys.stderr, flush=True)
            os._exit(1)  # the agent's threads are blocked on the store: nothing else can end them


def main(argv=None):
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    multi_node = str(args.nnodes) not in ("1", "1:1") and not args.standalone
    if multi_node and args.rdzv_backend == "c10d" and args.max_restarts == 0 and ":" in args.rdzv_endpoint:
        grace = float(os.environ.get("NANOCHAT_STORE_GRACE_S", STORE_GRACE_S))
        threading.Thread(target=watch_store, args=(args.rdzv_endpoint, grace), daemon=True).start()
    try:
        run(args)
    except SignalException as e:
        # by now torchrun has signalled the workers and waited for them to save and exit
        print(f"[launch] stopped by {e.sigval.name}: the workers saved at a step boundary; continue with --resume",
              file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        codes = []
        for rank, failure in sorted(e.failures.items()):
            codes.append(failure.exitcode)
            why = "its message is above" if failure.exitcode > 0 else "stopped by the launcher after that failure"
            print(f"[launch] rank {rank} exited with status {failure.exitcode} ({why})", file=sys.stderr,
                  flush=True)
        code = next((c for c in codes if c and c > 0), 1)
        sys.exit(code)
    except RendezvousError as e:
        cause = str(e).split(" See inner exception")[0]
        print(f"[launch] lost the other nodes: {type(e).__name__}: {cause} (the node hosting the rendezvous at "
              f"{args.rdzv_endpoint} was killed or is down); continue with --resume", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
