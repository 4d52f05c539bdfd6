"""A secret field of a stored record: written in full only when the record store serialises it.

Every other serialisation (API answers built from `model_dump()`, `model_dump(mode="json")`, logs,
repr) shows it masked, so a route that returns a whole record cannot leak it by accident. The store
asks for the real value with `context=STORE_CONTEXT` (sculptor/records.py).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import PlainSerializer, SecretStr, SerializationInfo

STORE_CONTEXT = {"sculptor_store": True}
MASK = "**********"


def _serialize(value: SecretStr | None, info: SerializationInfo) -> str | None:
    if value is None:
        return None
    return value.get_secret_value() if (info.context or {}).get("sculptor_store") else MASK


StoredSecret = Annotated[SecretStr | None, PlainSerializer(_serialize, return_type=str | None)]
