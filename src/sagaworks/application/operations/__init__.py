"""What operators use to find and look at sagas: the filter, the sort, the stuck reasons.

The operator commands (`sagaworks saga ...`) build a `SagaFilter`; the store
translates it to SQL (`adapters/postgres/saga_queries.py`). Bulk plans freeze
the sagas a filter selects, so one filter type serves listing and acting.
"""

from sagaworks.application.operations.filters import (
    STUCK_REASONS,
    SagaFilter,
    SagaSort,
    SortKey,
    StuckReason,
)
from sagaworks.application.operations.lookup import AmbiguousSaga, SagaNotFound, find_one_saga

__all__ = [
    "STUCK_REASONS",
    "AmbiguousSaga",
    "SagaFilter",
    "SagaNotFound",
    "SagaSort",
    "SortKey",
    "StuckReason",
    "find_one_saga",
]
