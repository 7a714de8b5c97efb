"""The sagas this process runs, by unique name, and the port names their steps use.

Which saga consumes which event type is not kept here: each saga has its own
queue, bound to the events its definition consumes (see the RabbitMQ topology).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sagaworks.domain.definition import SagaDefinition

__all__ = ["SagaRegistry", "UnknownSaga"]


class UnknownSaga(LookupError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        super().__init__(f'no saga named "{name}" is registered (known: {", ".join(known)})')


class SagaRegistry:
    def __init__(self, definitions: Iterable[SagaDefinition[Any]]) -> None:
        self._by_name: dict[str, SagaDefinition[Any]] = {}
        for definition in definitions:
            if definition.name in self._by_name:
                raise ValueError(f'two sagas are named "{definition.name}"')
            self._by_name[definition.name] = definition

    def __iter__(self) -> Iterator[SagaDefinition[Any]]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> SagaDefinition[Any]:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownSaga(name, self._by_name) from None

    def ports(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for d in self for p in d.ports()))
