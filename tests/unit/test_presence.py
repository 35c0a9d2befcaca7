"""presence.Presence: kept names are only ever the ones no event has touched since."""

from __future__ import annotations

from nodekeeper.containerd.presence import Presence

ID_A, ID_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def live(clock: Clock | None = None, ttl: float = 60.0) -> Presence:
    presence = Presence(clock or Clock(), ttl)
    presence.follow(True)
    return presence


def test_keeps_an_answer_while_following() -> None:
    presence = live()
    presence.learn("r/app:1", ID_A, presence.generation)
    assert presence.image_id("r/app:1") == ID_A
    assert presence.image_id("r/app:2") == ""


def test_keeps_nothing_before_the_stream_is_up() -> None:
    presence = Presence()
    presence.learn("r/app:1", ID_A, presence.generation)
    assert presence.image_id("r/app:1") == ""
    assert len(presence) == 0


def test_an_absent_image_is_not_kept() -> None:
    presence = live()
    presence.learn("r/app:1", "", presence.generation)
    assert len(presence) == 0


def test_an_event_forgets_the_name_only() -> None:
    presence = live()
    presence.learn("r/app:1", ID_A, presence.generation)
    presence.learn("r/app:2", ID_B, presence.generation)
    presence.changed("r/app:1")
    assert presence.image_id("r/app:1") == ""
    assert presence.image_id("r/app:2") == ID_B


def test_an_answer_asked_before_an_event_is_not_kept() -> None:
    # ImageStatus in flight, the image removed meanwhile: the late answer must not stick.
    presence = live()
    asked_at = presence.generation
    presence.changed("r/app:1")
    presence.learn("r/app:1", ID_A, asked_at)
    assert presence.image_id("r/app:1") == ""


def test_losing_the_stream_forgets_everything() -> None:
    presence = live()
    presence.learn("r/app:1", ID_A, presence.generation)
    asked_at = presence.generation
    presence.follow(False)
    assert presence.image_id("r/app:1") == ""
    presence.learn("r/app:1", ID_A, presence.generation)
    assert presence.image_id("r/app:1") == ""
    presence.follow(True)
    presence.learn("r/app:1", ID_A, asked_at)  # asked before the stream came back
    assert presence.image_id("r/app:1") == ""


def test_answers_expire_after_the_ttl() -> None:
    clock = Clock()
    presence = live(clock, ttl=60.0)
    presence.learn("r/app:1", ID_A, presence.generation)
    clock.now += 60.0
    assert presence.image_id("r/app:1") == ID_A
    clock.now += 0.001
    assert presence.image_id("r/app:1") == ""
    assert len(presence) == 0
