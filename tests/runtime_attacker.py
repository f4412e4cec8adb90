"""Another local account trying to act as Flower's task launcher (tests/test_security_superexec.py runs it as `nobody`).

It polls a runtime API on 127.0.0.1 (a site's SuperNode or the coordinator's SuperLink) with
Flower's own ``RuntimeHttpClient``, as Flower's SuperExec does: ``acquire-task`` unsigned, and
signed with a guessed secret through Flower's own signing code. Whatever it claims, it reads with
``pull-task-input``. It also calls the task-token methods with made-up tokens, looks for task
tokens and SuperExec secrets on every process's command line (``/proc/*/cmdline``) and tries them,
and tries to read every file under the folders it is given. It stops by itself after
``--seconds`` (or at SIGTERM) and prints one JSON report on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import time
from collections import Counter
from functools import partial
from pathlib import Path

TOKEN_ARG = re.compile(r"^[0-9a-f]{32,128}$")


def outcome(call) -> tuple[str, object]:
    """('ok', response) or ('refused:CODE', None) / ('error:...', None)."""
    import httpx
    from flwr.supercore.error import FlowerError

    try:
        return "ok", call()
    except httpx.HTTPStatusError as exc:
        error = FlowerError.from_json(exc.response.text)
        return f"refused:{exc.response.status_code}:{error.code if error else '?'}", None
    except Exception as exc:  # connection refused when a process is gone, etc.
        return f"error:{type(exc).__name__}", None


def client_for(address: str, ca: bytes | None, extra=()):
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(server_address=address, insecure=ca is None, root_certificates=ca,
                                                 interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), *extra])


def with_token(address: str, ca: bytes | None, token: str):
    from flwr.supercore.interceptors.http.runtime_token import RuntimeTokenHttpInterceptor

    return client_for(address, ca, [RuntimeTokenHttpInterceptor(token)])


def pull_input(address: str, ca: bytes | None, token: str) -> tuple[str, dict]:
    """What ``pull-task-input`` gives the holder of ``token``."""
    from flwr.proto.runtime_pb2 import PullTaskInputRequest

    client = with_token(address, ca, token)
    try:
        result, res = outcome(lambda: client.PullTaskInput(PullTaskInputRequest()))
    finally:
        client.close()
    if res is None:
        return result, {}
    return result, {"run_id": res.run.run_id, "fab_bytes": len(res.fab.content), "has_context": res.HasField("context"),
                    "run_config_keys": sorted(res.run.override_config.keys())[:10]}


def command_lines() -> list[list[str]]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                lines.append((entry / "cmdline").read_bytes().decode(errors="replace").split("\0"))
            except OSError:
                pass
    return lines


def readable_files(folders: list[str]) -> tuple[list[str], int]:
    """Files under ``folders`` this account could open and read, and how many it could not."""
    readable, denied = [], 0
    for folder in folders:
        for base, _dirs, files in os.walk(folder, onerror=lambda exc: None):
            for name in files:
                path = os.path.join(base, name)
                try:
                    with open(path, "rb") as f:
                        f.read(1)
                    readable.append(path)
                except OSError:
                    denied += 1
    return readable, denied


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True, help="the runtime API, 127.0.0.1:PORT")
    parser.add_argument("--task-type", required=True, help="flwr-clientapp (a site) or flwr-serverapp (the coordinator)")
    parser.add_argument("--ca", default=None, help="the federation's ca.crt (public) when the runtime API uses TLS")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--read", action="append", default=[], help="a folder whose files it tries to read")
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    from flwr.proto.runtime_pb2 import (
        AcquireTaskRequest,
        GetNodesRequest,
        PullAppMessagesRequest,
        PullTaskInputRequest,
        PushTaskOutputRequest,
        SendTaskHeartbeatRequest,
    )
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    methods = [("pull-task-input", "PullTaskInput", PullTaskInputRequest()),
               ("push-task-output", "PushTaskOutput", PushTaskOutputRequest()),
               ("send-task-heartbeat", "SendTaskHeartbeat", SendTaskHeartbeatRequest()),
               ("pull-messages", "PullMessages", PullAppMessagesRequest()), ("get-nodes", "GetNodes", GetNodesRequest())]

    ca = Path(args.ca).read_bytes() if args.ca else None
    plain = client_for(args.address, ca)
    guessed = client_for(args.address, ca, [SuperExecAuthHttpInterceptor(master_secret=secrets.token_bytes(32),
                                                                          protected_methods={"/flwr.proto.Runtime/AcquireTask"})])
    request = AcquireTaskRequest(supported_task_types=[args.task_type])
    acquire, guessed_acquire, token_methods, stolen = Counter(), Counter(), Counter(), Counter()
    claimed, pulled, tried_tokens = [], [], set()
    secret_paths, secret_reads = set(), Counter()
    readable_before, _ = readable_files(args.read)
    calls = 0
    while not stop and time.monotonic() < deadline:
        calls += 1
        for counter, client in ((acquire, plain), (guessed_acquire, guessed)):
            result, res = outcome(lambda c=client: c.AcquireTask(request))
            if res is not None and res.HasField("task") and res.token:
                result = "claimed"
                claimed.append({"task_id": res.task.task_id, "run_id": res.task.run_id, "type": res.task.type})
                pull_result, data = pull_input(args.address, ca, res.token)
                pulled.append({"result": pull_result, **data})
            elif result == "ok":
                result = "nothing pending"
            counter[result] += 1
        if calls % 10 == 1:  # the task-token methods with a made-up token
            fake = with_token(args.address, ca, secrets.token_hex(32))
            for name, method, message in methods:
                token_methods[f"{name} {outcome(partial(getattr(fake, method), message))[0]}"] += 1
            fake.close()
        for argv in command_lines():  # tokens and secrets where every account can read them
            for i, arg in enumerate(argv):
                value = argv[i + 1] if i + 1 < len(argv) else ""
                if arg == "--superexec-auth-secret-file":
                    secret_paths.add(value)
                elif arg == "--token-file" and value not in tried_tokens:
                    tried_tokens.add(value)
                    try:
                        candidates = [Path(value).read_text().strip()]
                        stolen["token files read"] += 1
                    except OSError:
                        candidates = []
                        stolen["token files unreadable"] += 1
                    for token in candidates:
                        stolen[f"token from file: {pull_input(args.address, ca, token)[0]}"] += 1
                elif arg == "--token" or TOKEN_ARG.match(arg):
                    token = value if arg == "--token" else arg
                    if not token or token in tried_tokens:
                        continue
                    tried_tokens.add(token)
                    stolen["tokens seen on command lines"] += 1
                    result, data = pull_input(args.address, ca, token)
                    stolen[f"token from command line: {result}"] += 1
                    if data:
                        pulled.append({"result": result, "from": "command line", **data})
        for path in secret_paths:
            try:
                Path(path).read_bytes()
                read = 1
            except OSError:
                read = 0
            secret_reads[path] += read
        time.sleep(args.interval)
    readable_after, denied = readable_files(args.read)
    print(json.dumps({
        "uid": os.getuid(), "address": args.address, "task_type": args.task_type, "polls": calls,
        "acquire_unsigned": dict(acquire), "acquire_guessed_secret": dict(guessed_acquire),
        "token_methods_made_up_token": dict(token_methods), "claimed": claimed, "pulled": pulled,
        "stolen_tokens": dict(stolen), "secret_paths_seen": sorted(secret_paths),
        "secret_reads": {p: n for p, n in secret_reads.items()},
        "readable_files": sorted(set(readable_before) | set(readable_after)), "unreadable_files": denied,
    }))


if __name__ == "__main__":
    main()
