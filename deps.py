"""The typed dependencies route handlers take (the hub, the broker, the settings, the caller), and the
`DirectRoute` for the hottest routes, which take none."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import APIKeyCookie, APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import Response

from auth import Principal, TokenCodec
from availability import Availability
from broker import Broker
from errors import unauthorized, validation_error
from hub import Hub, Window
from leases import Leases
from log_set import read_cursor
from models import QUEUE_NAME_PATTERN
from notifications import Notifications
from schemas import ID_LENGTH, INT64_MAX, NO_NUL
from sessions import COOKIE, session_token
from settings import Settings
from streams import StreamGate, resume_cursor
from tokens import Revocations, TokenStore

# The three ways a token comes: OpenAPI's security schemes `bearer`, `access_token`, `session`.
_bearer = HTTPBearer(
    auto_error=False, scheme_name="bearer", description="a token from `python main.py token`"
)
_access_token = APIKeyQuery(
    name="access_token",
    scheme_name="access_token",
    auto_error=False,
    description="the token in the query, for EventSource, which cannot send headers",
)
_session = APIKeyCookie(
    name=COOKIE,
    scheme_name="session",
    auto_error=False,
    description="the dashboard's sign-in (`POST /api/v1/session`), HttpOnly; a request that changes"
    " something must come from this server's own pages, else 403 `cross_origin`",
)


def hub_of(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def broker_of(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def revocations_of(request: Request) -> Revocations:
    revocations: Revocations = request.app.state.revocations
    return revocations


def stream_gate_of(request: Request) -> StreamGate:
    gate: StreamGate = request.app.state.stream_gate
    return gate


def notifications_of(request: Request) -> Notifications:
    notifications: Notifications = request.app.state.notifications
    return notifications


# Dependencies are `async def` although they never await: FastAPI runs plain `def` ones in a
# thread pool, a thread hop per request each. Routes that skip dependencies call the `_of`s.
async def _hub(request: Request) -> Hub:
    return hub_of(request)


async def _broker(request: Request) -> Broker:
    return broker_of(request)


async def _settings(request: Request) -> Settings:
    return settings_of(request)


async def _principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    access_token: Annotated[str | None, Depends(_access_token)],
    session: Annotated[str | None, Depends(_session)],
) -> Principal:
    del credentials, access_token, session  # declared for OpenAPI and validation; caller() reads them
    return caller(request)


def caller(request: Request) -> Principal:
    """Who sent `request`: its bearer token (header, else `access_token` query), else the
    dashboard's session cookie, else anonymous.

    Routes take it as a dependency (`CurrentPrincipal`); publish and the streams call it
    directly, since FastAPI's dependency solving measured a fifth of their CPU or more.
    """
    known: Principal | None = request.scope.get(_CALLER)
    if known is not None:
        return known
    token = _bearer_token(request) or session_token(request)
    if token:
        principal = token_principal(request, token)
    else:
        principal = request.app.state.anonymous
        if principal is None:
            raise unauthorized()
    # Read once a request: the rate limits read it first, then the route (and its dependency).
    request.scope[_CALLER] = principal
    return principal


_CALLER = "pombo.caller"


def token_principal(request: Request, token: str) -> Principal:
    """Who `token` speaks for: 401 if it is invalid, expired or revoked."""
    codec: TokenCodec = request.app.state.codec
    principal = codec.read(token)
    if principal.token_id is not None and principal.token_id in revocations_of(request):
        raise unauthorized("the token was revoked")
    return principal


async def _window(
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Window:
    return Window(limit, offset)


async def _leases(request: Request) -> Leases:
    leases: Leases = request.app.state.leases
    return leases


async def _notifications(request: Request) -> Notifications:
    return notifications_of(request)


async def _availability(request: Request) -> Availability:
    availability: Availability = request.app.state.availability
    return availability


async def _tokens(request: Request) -> TokenStore:
    tokens: TokenStore = request.app.state.tokens
    return tokens


def stream_cursor(request: Request) -> int | None:
    """Where a stream resumes: `Last-Event-ID`, as EventSource sends it, else `last_event_id`.

    One rule for both: a whole number from 0 to 2^63-1, else 422. A cursor that cannot be read
    is never taken for "live from now", which would skip whatever the client missed.
    """
    header = _sequence(request.headers.get("last-event-id"), "header.Last-Event-ID")
    query = _sequence(request.query_params.get("last_event_id"), "query.last_event_id")
    return resume_cursor(header, query)


def stream_positions(request: Request) -> dict[str, int] | None:
    """Where a stream of several logs resumes: its cursor vector (`log_set`), by the same rule
    (`Last-Event-ID` wins, each position a whole number from 0 to 2^63-1), else 422."""
    header = _positions(request.headers.get("last-event-id"), "header.Last-Event-ID")
    query = _positions(request.query_params.get("last_event_id"), "query.last_event_id")
    return header if header is not None else query


def stream_types(request: Request) -> frozenset[str] | None:
    """The event types a stream is limited to (`types=`, repeated or comma-separated), or all."""
    given = request.query_params.getlist("types")
    return frozenset(t.strip() for text in given for t in text.split(",") if t.strip()) or None


_SEQUENCE = f"a whole number from 0 to {INT64_MAX}"
_POSITIONS = f"log:sequence pairs, comma-separated (orders:41,@notifications:3), each {_SEQUENCE}"


def _sequence(given: str | None, where: str) -> int | None:
    if given is None:
        return None
    seq = _whole_number(given)
    if seq is None:
        raise validation_error({where: [_SEQUENCE]})
    return seq


def _positions(given: str | None, where: str) -> dict[str, int] | None:
    if given is None:
        return None
    positions = read_cursor(given, _whole_number)
    if positions is None:
        raise validation_error({where: [_POSITIONS]})
    return positions


def _whole_number(given: str) -> int | None:
    text = given.strip()
    # "²" is a digit int() refuses, and int() refuses more than 4,300 digits.
    if text.isascii() and text.isdigit() and len(text) <= len(str(INT64_MAX)) and int(text) <= INT64_MAX:
        return int(text)
    return None


# What the `CurrentPrincipal` dependency adds to a route's OpenAPI, for a route calling caller():
# any scheme will do.
CALLER_DOCS: dict[str, Any] = {
    "security": [{scheme.scheme_name: []} for scheme in (_bearer, _access_token, _session)],
}


# What a stream route calling caller() and stream_cursor() documents.
STREAM_DOCS: dict[str, Any] = {
    **CALLER_DOCS,
    "parameters": [
        {
            "name": "last_event_id",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
            "description": "resume after this sequence",
        },
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
            "description": f"set by EventSource; wins over last_event_id ({_SEQUENCE})",
        },
    ],
}


def _bearer_token(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials
    return request.query_params.get("access_token")


HubDep = Annotated[Hub, Depends(_hub)]
BrokerDep = Annotated[Broker, Depends(_broker)]
AvailabilityDep = Annotated[Availability, Depends(_availability)]
TokensDep = Annotated[TokenStore, Depends(_tokens)]
NotificationsDep = Annotated[Notifications, Depends(_notifications)]
LeasesDep = Annotated[Leases, Depends(_leases)]
SettingsDep = Annotated[Settings, Depends(_settings)]
CurrentPrincipal = Annotated[Principal, Depends(_principal)]
WindowDep = Annotated[Window, Depends(_window)]
QueueName = Annotated[
    str, Path(pattern=QUEUE_NAME_PATTERN, description="lowercase letters, digits, `.`, `_`, `-`")
]
# Ids are opaque: one the server never gave out is a 404, but a NUL must not reach the database.
ResourceId = Annotated[str, Path(pattern=NO_NUL, max_length=ID_LENGTH)]
TypeFilter = Annotated[str | None, Query(pattern=NO_NUL, max_length=64)]


class AuthFirst(APIRoute):
    """A route that reads its caller's token before FastAPI reads the body.

    FastAPI parses and validates a body before it solves any dependency: without this, a request
    with no valid token got 400 for broken JSON or 422 for a wrong field, where it should learn
    only that it must sign in (401). Every router takes it (`APIRouter(route_class=AuthFirst)`).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None or not _takes_caller(self.dependant):
            return handler

        async def handle(request: Request) -> Response:
            caller(request)  # a 401 now; the dependency reads the same token again (cached)
            return await handler(request)

        return handle


def _takes_caller(dependant: Dependant) -> bool:
    return _depends_on(dependant, (_principal,))


def _depends_on(dependant: Dependant, calls: tuple[Callable[..., Any], ...]) -> bool:
    return any(d.call in calls or _depends_on(d, calls) for d in dependant.dependencies)


# What routes that read or write the database depend on (direct routes call their `_of`s).
_STORED: tuple[Callable[..., Any], ...] = (_hub, _leases, _notifications, _tokens)


def reaches_database(route: APIRoute) -> bool:
    """Whether `route` reads or writes the database, so that an outage answers it 503."""
    return isinstance(route, DirectRoute) or _depends_on(route.dependant, _STORED)


Endpoint = Callable[..., Coroutine[Any, Any, Response]]
E = TypeVar("E", bound=Endpoint)


class DirectRoute(APIRoute):
    """A route whose endpoint takes only path parameters and the `Request`, called directly.

    FastAPI still documents it from its signature, and its path parameters are validated as
    FastAPI validates them; only the general dependency solving is skipped, which profiles put
    at a tenth of a publish's CPU (NOTES.md). The endpoint reads the rest through `caller()`,
    `stream_cursor()` and the `_of` accessors.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant, endpoint = self.dependant, self.endpoint
        others = dependant.query_params or dependant.header_params or dependant.cookie_params
        if others or dependant.body_params or dependant.dependencies:
            raise TypeError(f"{self.path}: a direct route takes path parameters and the Request only")
        path_params = dependant.path_params

        async def handle(request: Request) -> Response:
            values, errors = request_params_to_args(path_params, request.path_params)
            if errors:
                raise RequestValidationError(errors)
            response: Response = await endpoint(request, **values)
            return response

        return handle


def direct(router: APIRouter, method: str, path: str, **options: Any) -> Callable[[E], E]:
    """`@direct(router, "POST", path, ...)`: like `@router.post(path, ...)`, as a `DirectRoute`."""

    def register(endpoint: E) -> E:
        router.add_api_route(path, endpoint, methods=[method], route_class_override=DirectRoute, **options)
        return endpoint

    return register
