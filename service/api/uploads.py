"""Reading an upload's body: at most SCULPTOR_MAX_UPLOAD_BYTES, counted while it streams.

Content-Length alone is not a limit: a chunked body has none. So the bytes are counted as they arrive,
for JSON bodies and for multipart ones (fed to Starlette's own multipart parser through the counter),
and the upload stops with 413 at the first byte over the limit. Nothing has been stored by then: the
parser's spooled files are closed, and the route writes only after the whole upload was validated.
"""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from sculptor.datasets import DatasetError
from sculptor.text import check_text
from service.api.errors import ApiError

# A task upload has a handful of parts (file, eval_file, name, metric, hyperparameters, webhook_url).
MAX_FILES, MAX_FIELDS = 8, 32


def too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"the upload exceeds the limit of {max_bytes} bytes "
                    "(SCULPTOR_MAX_UPLOAD_BYTES): split the dataset into several tasks")


async def counted(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise too_large(max_bytes)
        yield chunk


async def read_body(request: Request, max_bytes: int) -> bytes:
    async with aclosing(request.stream()) as stream:
        return b"".join([chunk async for chunk in counted(stream, max_bytes)])


async def read_form(request: Request, max_bytes: int) -> FormData:
    """The multipart form, parsed while the body streams in through the byte counter."""
    async with aclosing(request.stream()) as stream:
        parser = MultiPartParser(request.headers, counted(stream, max_bytes), max_files=MAX_FILES,
                                 max_fields=MAX_FIELDS, max_part_size=max_bytes)
        try:
            return await parser.parse()
        except MultiPartException as err:
            raise ApiError(400, "invalid_multipart", f"the multipart/form-data body cannot be read: {err.message} "
                           "Send the JSONL dataset as a `file` part (curl -F file=@tasks.jsonl)") from None


def text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise DatasetError(f"the `{name}` part must be a text field, not a file upload: send -F '{name}=...' "
                           f"(curl's -F '{name}=<file' puts a file's content into a text field)",
                           code="invalid_field")
    return value


async def file_field(form: FormData, name: str) -> bytes | None:
    value = form.get(name)
    if isinstance(value, str):
        raise DatasetError(f"the `{name}` part must be a file upload holding JSONL, not a text field: "
                           f"curl -F {name}=@tasks.jsonl (with the @)", code="invalid_field")
    return None if value is None else await value.read()


def json_field(form: FormData, name: str) -> object:
    text = text_field(form, name)
    return load_json(text, f"the `{name}` field") if text else None


def load_json(raw: str | bytes, what: str) -> object:
    """json.loads with every way it can fail as a DatasetError a person can act on."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{what} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})",
                           err.lineno, code="invalid_json") from None
    except RecursionError:
        raise DatasetError(f"{what} nests arrays or objects too deeply to read: flatten it",
                           code="invalid_json") from None
    except ValueError as err:  # not UTF-8, or an integer of more than 4300 digits
        raise DatasetError(f"{what} cannot be read: {err}", code="invalid_json") from None
    problem = check_text(value, what)
    if problem:
        raise DatasetError(problem, code="invalid_text")
    return value
