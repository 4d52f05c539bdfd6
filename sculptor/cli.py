"""`sculptor`: a small command line client for the gateway's public API.

    sculptor submit data.jsonl --name arithmetic [--metric exact_match] [--hyperparameters '{"epochs": 3}']
    sculptor watch JOB_ID          # live progress; exit code 0 when the job is promoted, 1 otherwise
    sculptor jobs [--status running] [--task TASK_ID]
    sculptor models
    sculptor generate "What is 2 + 2?"

The gateway is `--url` or $SCULPTOR_URL (default http://127.0.0.1:8000); an API key is
`--api-key` or $SCULPTOR_API_KEY. Errors print the gateway's message and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

TERMINAL = {"promoted", "rejected", "failed", "cancelled", "superseded"}


class CliError(Exception):
    pass


def make_client(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(30.0, read=None))


def checked(response: httpx.Response) -> dict:
    if response.is_success:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    raise CliError(f"{response.request.method} {response.request.url.path} answered {response.status_code}: {message}")


# ---------- submit ----------
def cmd_submit(client: httpx.Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    data = {"name": args.name or path.stem, "metric": args.metric}
    if args.hyperparameters:
        data["hyperparameters"] = args.hyperparameters
    if args.webhook_url:
        data["webhook_url"] = args.webhook_url
    with path.open("rb") as f:
        answer = checked(client.post("/tasks", data=data, files={"file": (path.name, f, "application/jsonl")}))
    print(answer["job_id"])
    print(f"task {answer['task_id']}: job {answer['job_id']} is {answer['status']}", file=sys.stderr)
    return 0


# ---------- watch ----------
def progress_line(job_id: str, status: str, p: dict) -> str:
    total, step = p.get("total_steps") or 0, p.get("step") or 0
    width = 30
    filled = int(width * step / total) if total else 0
    bar = "#" * filled + "." * (width - filled)
    parts = [f"{job_id} [{bar}] {step}/{total or '?'}"]
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("eta_s") is not None:
        parts.append(f"eta {int(p['eta_s'])}s")
    return " ".join(parts + [status])


def sse_events(client: httpx.Client, job_id: str) -> Iterator[dict]:
    """The job's events (stored ones first, then live) from GET /jobs/{id}/events as SSE."""
    with client.stream("GET", f"/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as response:
        if not response.is_success:
            response.read()
            checked(response)
        for line in response.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line[5:].strip())


def cmd_watch(client: httpx.Client, args: argparse.Namespace) -> int:
    job = checked(client.get(f"/jobs/{args.job}"))
    status, progress = job["status"], job["progress"]
    live = sys.stdout.isatty()
    while status not in TERMINAL:
        try:
            for event in sse_events(client, args.job):
                if event["type"] == "progress":
                    progress = event
                else:
                    status = event["status"]
                line = progress_line(args.job, status, progress)
                print(f"\r{line}\033[K" if live else line, end="" if live else "\n", flush=True)
        except httpx.TransportError:
            pass  # the gateway restarted or the connection dropped: reconnect below
        job = checked(client.get(f"/jobs/{args.job}"))
        status = job["status"]
        if status not in TERMINAL:
            time.sleep(1.0)
    if live:
        print()
    print(f"{args.job}: {status}" + (f" ({job['candidate_version']})" if status == "promoted" else "")
          + (f": {job['error']}" if job.get("error") else ""))
    return 0 if status == "promoted" else 1


# ---------- listings ----------
def cmd_jobs(client: httpx.Client, args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("status", args.status), ("task_id", args.task), ("limit", args.limit)) if v}
    answer = checked(client.get("/jobs", params=params))
    print(f"{'JOB':<22} {'STATUS':<11} {'PROGRESS':<10} {'VERSIONS':<12} TASK")
    for j in answer["jobs"]:
        p = j["progress"]
        progress = f"{p['step']}/{p['total_steps']}" if p["total_steps"] else "-"
        versions = f"{j['parent_version'] or '-'}->{j['candidate_version'] or '?'}"
        print(f"{j['job_id']:<22} {j['status']:<11} {progress:<10} {versions:<12} {j['task_id']}")
    print(f"({len(answer['jobs'])} of {answer['total']})", file=sys.stderr)
    return 0


def cmd_models(client: httpx.Client, args: argparse.Namespace) -> int:
    answer = checked(client.get("/models"))
    for v in answer["versions"]:
        marks = " ".join(m for m, on in (("serving", v["serving"]), ("current", v["current"]),
                                         ("forced", v.get("forced"))) if on)
        parent = f"<- {v['parent']}" if v.get("parent") else "(base)"
        print(f"{v['version']:<6} {parent:<10} task={v.get('task_id') or '-':<22} {marks}")
    return 0


def cmd_generate(client: httpx.Client, args: argparse.Namespace) -> int:
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.chat:
        body = {"messages": [{"role": "user", "content": body.pop("prompt")}], **body}
    answer = checked(client.post("/generate", json=body))
    print(answer["text"])
    print(f"[{answer['model_version']}]", file=sys.stderr)
    return 0


# ---------- arguments ----------
def json_object(text: str) -> str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"epochs\": 3}'")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sculptor", description="Client for a Sculptor gateway.")
    parser.add_argument("--url", default=os.environ.get("SCULPTOR_URL", "http://127.0.0.1:8000"),
                        help="gateway base URL (env SCULPTOR_URL)")
    parser.add_argument("--api-key", default=os.environ.get("SCULPTOR_API_KEY"), help="API key (env SCULPTOR_API_KEY)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="upload a JSONL dataset as a new task; prints the job id")
    p.add_argument("file")
    p.add_argument("--name", help="task name (default: the file name)")
    p.add_argument("--metric", default="exact_match", choices=["exact_match", "contains", "rougeL"])
    p.add_argument("--hyperparameters", type=json_object, help="JSON object, e.g. '{\"epochs\": 3}'")
    p.add_argument("--webhook-url", help="URL to POST the job to when it ends")
    p.set_defaults(run=cmd_submit)

    p = sub.add_parser("watch", help="follow a job until it ends; exit 0 if promoted, 1 otherwise")
    p.add_argument("job")
    p.set_defaults(run=cmd_watch)

    p = sub.add_parser("jobs", help="list jobs, newest first")
    p.add_argument("--status")
    p.add_argument("--task", help="only this task's jobs")
    p.add_argument("--limit", type=int)
    p.set_defaults(run=cmd_jobs)

    p = sub.add_parser("models", help="the model lineage")
    p.set_defaults(run=cmd_models)

    p = sub.add_parser("generate", help="generate text with the serving version")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    p.set_defaults(run=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with make_client(args) as client:
            return args.run(client, args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except httpx.TransportError as err:
        print(f"error: cannot reach {args.url}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
