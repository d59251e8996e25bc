"""Field types for JSON request bodies that take values as JSON Schema reads them, not as
pydantic's lax mode would coerce them: a boolean is only ``true``/``false``, an integer is a
JSON number with no fraction (``5`` or ``5.0``, never ``true`` or ``"5"``), a number is any JSON
number (never a boolean or a string). What OpenAPI declares is then what the server takes."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, Strict

SEED_MODULUS = 2**63  # torch.Generator.manual_seed takes any value in [0, 2**63)

JsonFloat = Annotated[float, Strict()]  # strict float still takes JSON integers
JsonBool = Annotated[bool, Strict()]


def _integral_number(value: Any) -> Any:
    # JSON Schema's "integer" is any number with no fraction: 7.0 is one, so it must pass.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(*, ge: int | None = None, le: int | None = None) -> Any:
    """A JSON integer within [ge, le]. The bounds sit inside the type so that they reach the
    integer schema (and OpenAPI's minimum/maximum) before the float-to-int step wraps it."""
    return Annotated[int, Strict(), Field(ge=ge, le=le), BeforeValidator(_integral_number)]


JsonInt = json_int()


def _reduce_seed(value: int) -> int:
    return value % SEED_MODULUS


def seed_type(*, ge: int | None = None) -> Any:
    """A sampling seed: any JSON integer (``ge`` aside), reduced modulo 2**63. No upper bound to
    misread: 2**63-1 is not exact in a double, so a client's JSON library may round it up."""
    return Annotated[json_int(ge=ge), AfterValidator(_reduce_seed)]


Seed = seed_type(ge=0)  # seeds 001 and 002 take no negative seed
SignedSeed = seed_type()  # OpenAI takes any integer
