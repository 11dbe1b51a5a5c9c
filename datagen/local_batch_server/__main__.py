"""``python -m datagen.local_batch_server``: serve the stand-in until Ctrl+C."""

from __future__ import annotations

import argparse
import sys
import time

from datagen.common.cli import number
from datagen.local_batch_server.server import BANNER, LocalBatchServer
from datagen.local_batch_server import server as _server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datagen.local_batch_server", description=_server.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--api_key", default="sk-local",
                        help="bearer token clients must send ('' accepts any)")
    parser.add_argument("--step_seconds", type=number(0), default=1.0,
                        help="seconds between a batch's status steps")
    parser.add_argument("--work_steps", type=int, default=2,
                        help="in_progress steps a batch takes to answer its requests")
    parser.add_argument("--token_limit", type=int, default=None, metavar="N",
                        help="enqueued-token limit per model (default: none)")
    args = parser.parse_args(argv)
    server = LocalBatchServer(port=args.port, api_key=args.api_key or None, step_seconds=args.step_seconds,
                              work_steps=args.work_steps, token_limit=args.token_limit).start()
    print(f"{BANNER}\nlistening on {server.base_url}  (set OPENAI_BASE_URL={server.base_url}; "
          f"key: {'any' if not args.api_key else 'the --api_key given'}); Ctrl+C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
