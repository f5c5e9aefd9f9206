"""The transition table: every state reachable, CLOSED final, errors named."""

from __future__ import annotations

from postroom.smtp.codes import BAD_SEQUENCE
from postroom.smtp.states import (
    COMMAND_STATES,
    TRANSACTION_STATES,
    TRANSITIONS,
    Input,
    State,
    allowed,
    next_state,
    sequence_error,
)


def test_every_state_but_closed_is_reachable_from_wait_helo() -> None:
    seen = {State.WAIT_HELO}
    frontier = [State.WAIT_HELO]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(State) - {State.CLOSED}


def test_closed_is_final_and_reading_states_only_end() -> None:
    assert not any(source is State.CLOSED for source, _ in TRANSITIONS)
    assert {step for (source, step) in TRANSITIONS if source is State.IN_DATA} == {Input.END}
    assert {step for (s, step) in TRANSITIONS if s is State.IN_BDAT} == {Input.END, Input.CHUNK}


def test_hello_and_rset_are_allowed_wherever_commands_are_read() -> None:
    for state in COMMAND_STATES:
        assert allowed(state, Input.HELLO) and allowed(state, Input.RSET)
        expected = State.WAIT_HELO if state is State.WAIT_HELO else State.WAIT_MAIL
        assert next_state(state, Input.RSET) is expected


def test_transaction_states() -> None:
    assert State.WAIT_MAIL not in TRANSACTION_STATES
    assert {State.WAIT_RCPT, State.IN_DATA, State.WAIT_BDAT} <= TRANSACTION_STATES


def test_sequence_errors() -> None:
    reply = sequence_error(State.WAIT_HELO, Input.MAIL)
    assert (reply.code, reply.enhanced, reply.text) == (
        503, "5.5.1", "Error: send HELO/EHLO first"
    )
    assert sequence_error(State.WAIT_BDAT, Input.DATA).text == "Error: DATA after BDAT"
    assert sequence_error(State.IN_DATA, Input.MAIL) == BAD_SEQUENCE
