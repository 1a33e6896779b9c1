"""The detection script's arguments: what a client chooses stays an argument of its own."""

from __future__ import annotations

from proxy import detection
from scoring import risk


def test_detection_arguments_keep_a_hostile_identity_in_an_argument_of_its_own():
    """The message's numbers go as one space-separated argument; the identity, the campaign
    member and the answers' identities, which a client chooses, never go inside it."""
    hostile = 'x y\r\n1 2 3\x00"@evil.example'
    answers = [("a b 9 9", 3, 1)]
    args = detection._args(detection.Evidence(identity=hostile, recipients=("r@d.example",),
                                              fingerprint="abcd1234", spam_score=2.5),
                           risk.Settings(), 3600.0 * 5 + 1, 2, True, answers, "m x", "f y")
    assert args[1] == hostile.lower()
    assert args[2].split() == ["5", "1", "1", "2", "0", "0", "0", "2.5", "5.0", "20.0",
                               "3600.0", "60.0", "120.0", "400.0", "10", "1"]
    assert args[3:10] == ["m x", "f y", 1, "a b 9 9", 3, 1, "d.example"]
