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
speedrun.sh and the train_*.sh wrappers launch through it; plain `torchrun` works the same apart from the endings.
"""
from __future__ import annotations

import sys


def main(argv=None):
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
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
