"""Every subject is built and parsed by one object; these pin its layout."""

from __future__ import annotations

import pytest

from engine.contracts.errors import EventRejected
from engine.contracts.subjects import InputSubject, Subjects, object_chunks, object_meta, srv, valid_source


def test_each_subject_of_a_prefix() -> None:
    s = Subjects("edge.site1")
    assert s.input("cam", "image") == "edge.site1.in.cam.image"
    assert s.result("cam") == "edge.site1.out.cam"
    assert s.dlq("cam") == "edge.site1.dlq.cam"
    assert s.late("cam") == "edge.site1.late.cam"
    assert s.service("health") == "edge.site1.svc.health"
    assert s.service("config") == "edge.site1.svc.config"
    assert s.reload("ABC") == "edge.site1.svc.reload.ABC"
    assert srv("INFO") == "$SRV.INFO.autoglm"
    assert (object_chunks("b"), object_meta("b")) == ("$O.b.C.>", "$O.b.M.>")
    assert (object_chunks("b", "N1"), object_meta("b", "*")) == ("$O.b.C.N1", "$O.b.M.*")
    assert Subjects().prefix == "autoglm"


def test_wildcards_cover_what_they_name() -> None:
    s = Subjects("p")
    assert (s.inputs, s.results, s.rejections, s.lates) == ("p.in.>", "p.out.>", "p.dlq.>", "p.late.>")
    assert s.outputs == ("p.out.>", "p.dlq.>", "p.late.>")
    assert (s.services, s.everything) == ("p.svc.>", "p.>")


def test_patterns_are_the_builders_with_placeholders() -> None:
    s = Subjects("autoglm")
    assert s.input_pattern() == "autoglm.in.{source}.{modality}"
    assert s.input_pattern("<source>", "<modality>") == "autoglm.in.<source>.<modality>"
    assert (s.result_pattern(), s.dlq_pattern(), s.late_pattern()) == (
        "autoglm.out.{source}",
        "autoglm.dlq.{source}",
        "autoglm.late.{source}",
    )


def test_a_source_that_cannot_stand_in_a_subject_goes_to_the_catch_all_dlq() -> None:
    s = Subjects("p")
    assert s.dlq(None) == s.dlq("") == s.dlq("a.b") == s.dlq("x" * 65) == "p.dlq._"
    assert valid_source("cam-1_A") and not valid_source("ca$m")


def test_parsing_round_trips_and_refuses_the_rest() -> None:
    s = Subjects("edge.site1")
    assert s.parse_input(s.input("cam", "audio")) == InputSubject("cam", "audio")
    assert (s.source_of("edge.site1.in.cam.text"), s.modality_of("edge.site1.in.cam.text")) == ("cam", "text")
    for bad in ("edge.site1.in.cam", "edge.site1.in.cam.video", "autoglm.in.cam.text", "edge.site1.out.cam"):
        with pytest.raises(EventRejected) as info:
            s.parse_input(bad)
        assert info.value.reason == "bad_subject"
        assert s.input_or_none(bad) is None and s.source_of(bad) is None and s.modality_of(bad) is None


def test_a_prefix_must_be_subject_tokens() -> None:
    for bad in ("", "a..b", "a.>", "a b", "a.*"):
        with pytest.raises(ValueError, match="subject prefix"):
            Subjects(bad)
