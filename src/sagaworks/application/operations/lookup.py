"""`ID_OR_KEY`: how an operator names one saga, by its id or by its business key."""

from __future__ import annotations

from sagaworks.application.ports.saga_queries import SagaQueries, SagaSummary

__all__ = ["AmbiguousSaga", "SagaNotFound", "find_one_saga"]


class SagaNotFound(LookupError):
    def __init__(self, ref: str, saga_type: str | None) -> None:
        of_type = f" of type {saga_type}" if saga_type else ""
        super().__init__(
            f"no saga{of_type} has the id or business key {ref!r}; "
            "find it with `sagaworks saga list --key-prefix ...` or `--type ...`"
        )


class AmbiguousSaga(LookupError):
    def __init__(self, ref: str, found: list[SagaSummary]) -> None:
        types = ", ".join(sorted({s.saga_type for s in found}))
        super().__init__(
            f"{len(found)} sagas have the business key {ref!r} (types {types}); "
            "say which with --type TYPE, or give the saga id"
        )


async def find_one_saga(queries: SagaQueries, ref: str, saga_type: str | None) -> SagaSummary:
    """The one saga `ref` names; its id wins over a business key that happens to equal it."""
    found = list(await queries.matching(ref, saga_type))
    by_id = [s for s in found if str(s.id) == ref.strip().lower()]
    if by_id:
        return by_id[0]
    if not found:
        raise SagaNotFound(ref, saga_type)
    if len(found) > 1:
        raise AmbiguousSaga(ref, found)
    return found[0]
