"""Model prices: the table shipped in ``shared/prices.toml``, extended by the user's file.

Money is ``decimal.Decimal`` throughout. Prices are read from TOML floats through their
shortest ``repr`` (``0.88`` becomes ``Decimal("0.88")``, not the binary float's 53-bit
value), and ``tokens * price / 1_000_000 * (1 - discount)`` is then exact (Decimal keeps 28
digits, far more than any token count times a price needs): the sum of requests' costs
equals the cost of their summed tokens to the last digit, so totals never drift from rows.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from shared.settings import ENV_PREFIX

SHIPPED_FILE = "prices.toml"
PER_TOKENS = Decimal(1_000_000)
_FIELDS = ("input_per_1m", "output_per_1m", "batch_discount")
_PRICE_FIELDS = ("input_per_1m", "output_per_1m")
# "Models not listed have no discount" (Together's batch docs).
_DEFAULT_DISCOUNT = Decimal(0)


class PriceFileError(ValueError):
    """A price table is unreadable or holds a bad value; the message names file and field."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's real-time list prices (USD per 1M tokens) and its batch discount (0..1)."""

    input_per_1m: Decimal
    output_per_1m: Decimal
    batch_discount: Decimal = _DEFAULT_DISCOUNT


@dataclass(frozen=True, slots=True)
class Cost:
    """What some tokens cost, in USD: at batch prices and at real-time prices."""

    batch: Decimal
    realtime: Decimal

    @property
    def savings(self) -> Decimal:
        """What batching saved over sending the same tokens in real time."""
        return self.realtime - self.batch

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.batch + other.batch, self.realtime + other.realtime)


ZERO_COST = Cost(Decimal(0), Decimal(0))


class PriceTable(Mapping[str, ModelPrice]):
    """Prices by exact model name; a model it does not hold is unpriced (``cost`` is None)."""

    def __init__(self, prices: Mapping[str, ModelPrice]) -> None:
        self._prices = dict(prices)

    def __getitem__(self, model: str) -> ModelPrice:
        return self._prices[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> Cost | None:
        """The cost of these tokens on ``model``, or None when the model has no price."""
        price = self._prices.get(model)
        if price is None:
            return None
        realtime = (
            Decimal(prompt_tokens) * price.input_per_1m
            + Decimal(completion_tokens) * price.output_per_1m
        ) / PER_TOKENS
        return Cost(batch=realtime * (1 - price.batch_discount), realtime=realtime)


def load_price_table(user_file: Path | None = None) -> PriceTable:
    """The shipped table, with ``user_file`` (BATCHBRIDGE_PRICES_FILE) laid over it.

    Raises PriceFileError naming the file, the model and the field of any bad entry.
    """
    shipped = resources.files("shared").joinpath(SHIPPED_FILE)
    fields = _read_entries(shipped.read_text(encoding="utf-8"), f"shared/{SHIPPED_FILE}")
    if user_file is not None:
        try:
            text = Path(user_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise PriceFileError(
                f"{user_file}: cannot read the price file ({reason}); "
                f"it is named by {ENV_PREFIX}PRICES_FILE"
            ) from None
        # A model given in the user's file overrides the fields it sets, keeping the rest.
        for model, entry in _read_entries(text, str(user_file)).items():
            fields[model] = {**fields.get(model, {}), **entry}
        source = str(user_file)
    else:
        source = f"shared/{SHIPPED_FILE}"
    return PriceTable({m: _price(source, m, entry) for m, entry in fields.items()})


def _read_entries(text: str, source: str) -> dict[str, dict[str, Decimal]]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceFileError(f"{source}: not valid TOML ({exc})") from None
    unknown = sorted(set(document) - {"models"})
    if unknown:
        raise PriceFileError(
            f"{source}: unknown top-level key {unknown[0]!r}; prices go in "
            '[models."<model name>"] tables'
        )
    models = document.get("models", {})
    if not isinstance(models, dict):
        raise PriceFileError(f'{source}: "models" must be a table of [models."<model name>"]')
    entries = {}
    for model, entry in models.items():
        if not isinstance(entry, dict):
            raise PriceFileError(
                f"{source}: model {model!r}: must be a table with {', '.join(_FIELDS)}"
            )
        entries[model] = {
            field: _number(source, model, field, value) for field, value in entry.items()
        }
    return entries


def _number(source: str, model: str, field: str, value: Any) -> Decimal:
    where = f"{source}: model {model!r}: {field}"
    if field not in _FIELDS:
        raise PriceFileError(f"{where}: unknown field; the fields are {', '.join(_FIELDS)}")
    # bool is an int to Python, but `true` is no price.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PriceFileError(f"{where}: must be a number (got {value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise PriceFileError(f"{where}: must be a finite number (got {value!r})")
    # repr gives the shortest text that reads back as the same float: what the file said.
    number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if field == "batch_discount":
        if not 0 <= number <= 1:
            raise PriceFileError(
                f"{where}: must be between 0 and 1, e.g. 0.5 for 50% off (got {value!r})"
            )
    elif number < 0:
        raise PriceFileError(f"{where}: must not be negative (got {value!r})")
    return number


def _price(source: str, model: str, entry: Mapping[str, Decimal]) -> ModelPrice:
    missing = [field for field in _PRICE_FIELDS if field not in entry]
    if missing:
        raise PriceFileError(
            f"{source}: model {model!r}: {missing[0]} is missing (USD per 1M tokens); a model "
            "the shipped table does not price needs both input_per_1m and output_per_1m"
        )
    return ModelPrice(
        input_per_1m=entry["input_per_1m"],
        output_per_1m=entry["output_per_1m"],
        batch_discount=entry.get("batch_discount", _DEFAULT_DISCOUNT),
    )
