"""The replica a request goes to is chosen by one explicit call on its index view (``IndexView.choose``)."""

from collections.abc import Hashable, Sequence

from gateway.metrics import Metrics
from gateway.planning.planner import Planner
from gateway.planning.residency import Residency
from gateway.settings import load_settings
from gateway.wire.chat import decode_request

DOCS = "".join(f"<document id={i}>fact number {i} " + "about the subject " * 20 + "</document>\n" for i in range(4))
BODY = b'{"model":"m","messages":[{"role":"system","content":' + repr(DOCS).replace("'", '"').encode() + b"}]}"


class _Choosing:
    """Two replicas; records every ``choose`` and picks the second."""

    def __init__(self) -> None:
        self.replicas = [Residency(max_requests=100, stateless=False) for _ in range(2)]
        self.calls: list[Sequence[tuple[Hashable, Sequence[int]]]] = []

    def choose(self, groups: Sequence[tuple[Hashable, Sequence[int]]]) -> Residency:
        self.calls.append(groups)
        return self.replicas[1]


def test_one_choice_per_plan_and_the_plan_is_the_chosen_replicas() -> None:
    planner = Planner(load_settings(environ={}), Residency(max_requests=100, stateless=False), Metrics())
    view = _Choosing()
    planned = planner.plan(planner.read(decode_request(BODY, "/v1/chat/completions"), {}), "req-1", view=view)
    assert len(view.calls) == 1
    ((_key, blocks),) = view.calls[0]  # the request's first block group
    assert len(blocks) == 4
    assert planned.residency is view.replicas[1]
    planned.accept()
    assert len(view.replicas[1].index) == 1 and len(view.replicas[0].index) == 0


def test_a_request_without_groups_is_still_chosen_once() -> None:
    planner = Planner(load_settings(environ={}), Residency(max_requests=100, stateless=False), Metrics())
    view = _Choosing()
    body = decode_request(b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', "/v1/chat/completions")
    planned = planner.plan(planner.read(body, {}), "req-2", view=view)
    assert view.calls == [()]
    assert planned.residency is view.replicas[1]
