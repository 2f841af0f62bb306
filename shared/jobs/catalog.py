"""The job catalog: every task type a job can run, with its payload model.

A task type is one decorated function in a module of `shared/jobs/tasks/`; the
modules there are imported by `load_catalog()`, so adding a module is all it takes:

    class ReversePayload(BaseModel):
        text: str

    @job_task("reverse")
    def reverse(payload: ReversePayload, context: JobContext) -> dict[str, Any]:
        return {"reversed": payload.text[::-1]}

The payload model is the annotation of the first parameter. The command API
validates a submission against it (a failure is a 422 naming the fields), and the
worker validates the stored payload again before it calls the handler.

Handlers are plain functions: the worker runs them in a thread of their own, so
they may compute as long as they need. A handler ends a job by returning its
`result_data` (a JSON object), or by raising:

- `JobError(message)`: the job fails with that message;
- `RetryableJobError(message)`: the job is retried with backoff up to its
  `max_retries`, then fails with that message;
- anything else: the job fails, naming the exception (unless the task type lists
  the exception class in `retry_on`).

A long handler should call `context.progress(fraction)` now and then, and either
wait with `context.sleep(seconds)` or call `context.check()` between steps: both
raise `JobInterrupted` once the job is cancelled or timed out, which is how a
handler stops within a second.
"""

import importlib
import inspect
import pkgutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

from pydantic import (
    BaseModel,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from shared.errors import ValidationFailed
from shared.inputs import problems

JobResult = dict[str, Any]
Handler = Callable[[Any, "JobContext"], JobResult]


def _keep_int(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    validated = handler(value)
    return value if type(value) is int else validated


# For a `float` field whose value goes back to the client as it was sent: an int
# stays an int (`2`, not `2.0`). Use as `Annotated[float, Strict(), KeepsInt]`.
KeepsInt = WrapValidator(_keep_int)


class JobError(Exception):
    """Raised by a handler to end its job as FAILURE with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RetryableJobError(JobError):
    """Raised by a handler when trying the job again later may succeed."""


class JobInterrupted(Exception):
    """Raised inside a handler once the worker asked it to stop."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownTask(ValidationFailed):
    def __init__(self, task: str, known: list[str]) -> None:
        super().__init__(f"unknown task {task!r}; known tasks: {', '.join(known)}")
        self.task = task
        self.known = known


class InvalidPayload(ValidationFailed):
    def __init__(self, task: str, errors: list[dict[str, Any]]) -> None:
        fields = ", ".join(".".join(map(str, e["loc"])) or "payload" for e in errors)
        super().__init__(f"invalid payload for task {task!r}: {fields}")
        self.task = task
        self.errors = errors


class JobContext:
    """What a running handler may ask of the worker; safe to use from any thread.

    The handler reports progress and notices a stop; the worker reads the latest
    progress at its own pace (so a handler may report as often as it likes) and
    calls `stop` when the job is cancelled or runs out of time.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._reason = ""
        self._progress: float | None = None
        self._progress_seen: float | None = None

    def progress(self, fraction: float) -> None:
        """Report how far the job is, from 0.0 to 1.0."""
        with self._lock:
            self._progress = min(1.0, max(0.0, float(fraction)))

    def check(self) -> None:
        """Raise JobInterrupted if the job was asked to stop."""
        if self._stop.is_set():
            raise JobInterrupted(self._reason)

    def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or raise JobInterrupted as soon as a stop is asked."""
        if self._stop.wait(max(0.0, seconds)):
            raise JobInterrupted(self._reason)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self, reason: str) -> None:
        with self._lock:
            self._reason = self._reason or reason
        self._stop.set()

    def take_progress(self) -> float | None:
        """The progress reported since the last call, or None if it did not move."""
        with self._lock:
            if self._progress == self._progress_seen:
                return None
            self._progress_seen = self._progress
            return self._progress


@dataclass(frozen=True)
class TaskType:
    name: str
    payload_model: type[BaseModel]
    handler: Handler
    retry_on: tuple[type[BaseException], ...] = ()
    summary: str = ""

    def parse(self, payload: Any) -> BaseModel:
        """The payload as the task's model; raises InvalidPayload naming fields."""
        try:
            return self.payload_model.model_validate(payload)
        except ValidationError as exc:
            errors = [
                {
                    "loc": ["payload", *error["loc"]],
                    "msg": error["msg"],
                    "type": error["type"],
                }
                for error in exc.errors(include_url=False, include_input=False)
            ]
            raise InvalidPayload(self.name, errors) from None

    def run(self, payload: Any, context: JobContext) -> JobResult:
        result = self.handler(self.parse(payload), context)
        if not isinstance(result, dict):
            raise TypeError(f"task {self.name} returned {type(result).__name__}")
        # Caught here, not by the store, which would keep NaN as null unsaid.
        for path, problem in problems(result):
            where = ".".join(map(str, ("result_data", *path)))
            raise JobError(f"the result cannot be stored: {where}: {problem}")
        return result


class JobCatalog:
    """Task types by name. `task` is the decorator that registers one."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskType] = {}

    def task(
        self, name: str, *, retry_on: tuple[type[BaseException], ...] = ()
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.add(
                TaskType(
                    name=name,
                    payload_model=_payload_model(handler),
                    handler=handler,
                    retry_on=retry_on,
                    summary=inspect.getdoc(handler) or "",
                )
            )
            return handler

        return register

    def add(self, task_type: TaskType) -> None:
        existing = self._tasks.get(task_type.name)
        if existing is not None and existing.handler is not task_type.handler:
            raise ValueError(f"task {task_type.name} is registered twice")
        self._tasks[task_type.name] = task_type

    def get(self, name: str) -> TaskType:
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTask(name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def validate(self, name: str, payload: Any) -> BaseModel:
        """Raise UnknownTask or InvalidPayload unless `payload` suits task `name`."""
        return self.get(name).parse(payload)


def _payload_model(handler: Handler) -> type[BaseModel]:
    parameters = list(inspect.signature(handler).parameters)
    hints = get_type_hints(handler)
    model = hints.get(parameters[0]) if parameters else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(
            f"{handler.__qualname__}: annotate the first parameter with the"
            " payload's pydantic model"
        )
    return model


catalog = JobCatalog()
job_task = catalog.task
_loading = threading.Lock()
_loaded = False


def load_catalog() -> JobCatalog:
    """The catalog with every module of `shared.jobs.tasks` imported (once)."""
    global _loaded
    if _loaded:
        return catalog
    with _loading:
        package = importlib.import_module("shared.jobs.tasks")
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
        _loaded = True
    return catalog
