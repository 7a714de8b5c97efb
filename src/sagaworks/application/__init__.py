"""Use cases and the ports they need; adapters implement the ports, entry points call the cases.

Use cases (each a class named for what it does, called with one input):
    handle_event.py         HandleEvent: an event from another service reaches its saga
    handle_step_command.py  HandleStepCommand: run a step's action or compensation on its port
    apply_inputs.py         ApplyInputs: the one route from an input to `decide()` to a write
    timers.py               FireDueTimers, ExpireParkedEvents: what the clock sets off
    dead_letters.py         IngestDeadLetter, ReplayDeadLetters, EditDeadLetter,
                            ArchiveDeadLetters, PurgeDeadLetters
    oversized.py            RejectOversized: a body over the limit, stored cut short, unparsed
    retention.py            PruneDatabase: delete what retention allows, in short batches
    read_rollup.py          RollUpHistory: fold settled history into the dashboards' minutes
    circuit.py              RecordBreakerChange, and CircuitOpen: a call a breaker refused
    operator_actions.py     ActOnSaga: a person's action on one saga, through ApplyInputs' route
    operator_plans.py       MakeSagaPlan, MakeReplayPlan, ApplyPlan: bulk work, plan then apply

What they share:
    ports/                  every port (Protocol) and the records that cross it
    config.py               EngineOptions and PortPolicy: limits and per-port patience
    results.py              Handled: what became of one delivery, the one result type
    parsing.py              a delivery to a typed message, or the reason it is rejected
    boundary.py             who may publish each event type, and from which exchange
    wire.py                 outgoing messages in neutral outbox form
    stored.py               rules every store shares (failure groups, lock order, saga rows)
    outbox.py               OutboxRelay: publishes committed rows, now and by the sweeper
    eager.py                EagerSteps: runs a committed step command here, leased, not sent
    published_marks.py      marks published rows in batches
    batching.py             group commit: requests arriving together share a transaction
    registry.py             the sagas this process runs and the ports they use
    operations/             what operators find sagas by: SagaFilter, stuck reasons,
                            find_one_saga (a saga named by id or business key)
"""
