"""The lines an answer came from (core/evidence.py), on small pieces with known answers."""

from __future__ import annotations

from repomem.core.evidence import MAX_LINES, EvidencePiece, find_evidence

CONSTANTS = EvidencePiece("c1", "pkg/models.py", 10, "\n".join([
    "REDIRECT_STATI = (301, 302, 303, 307, 308)",
    "DEFAULT_REDIRECT_LIMIT = 30",
    "CONTENT_CHUNK_SIZE = 10 * 1024",
    "ITER_CHUNK_SIZE = 512",
]))
HEADERS = EvidencePiece("c2", "pkg/utils.py", 40, "\n".join([
    "def default_headers():",
    '    """Return a dict of default headers."""',
    "    return CaseInsensitiveDict({",
    '        "User-Agent": default_user_agent(),',
    '        "Accept-Encoding": DEFAULT_ACCEPT_ENCODING,',
    '        "Accept": "*/*",',
    '        "Connection": "keep-alive",',
    "    })",
]))


def _idf(term: str) -> float:
    return 1.0


def test_the_line_holding_the_answers_value_is_the_evidence() -> None:
    ev = find_evidence("ITER_CHUNK_SIZE is 512.", "What is ITER_CHUNK_SIZE?", [HEADERS, CONSTANTS], _idf)
    assert ev is not None and (ev.path, ev.start_line, ev.end_line) == ("pkg/models.py", 13, 13)
    assert ev.text == "ITER_CHUNK_SIZE = 512" and ev.location == "pkg/models.py:13-13" and ev.cube_id == "c1"


def test_a_near_miss_shows_the_neighbour_it_quoted() -> None:
    # the model answered with the redirect limit to a question about the chunk size: the evidence shows that line
    ev = find_evidence("It is 30, from DEFAULT_REDIRECT_LIMIT.", "What is CONTENT_CHUNK_SIZE?", [CONSTANTS], _idf)
    assert ev is not None and ev.text == "DEFAULT_REDIRECT_LIMIT = 30"


def test_terms_the_question_already_said_count_less_than_what_the_answer_adds() -> None:
    piece = EvidencePiece("c4", "h.py", 1, "HEADER_NAME = 'Accept'  # the accept header\nDEFAULT_ENCODING = 'gzip'")
    ev = find_evidence("The Accept header is gzip.", "Which Accept header is sent?", [piece], _idf)
    assert ev is not None and ev.text == "DEFAULT_ENCODING = 'gzip'"


def test_neighbours_that_match_nearly_as_well_join_up_to_max_lines() -> None:
    ev = find_evidence("User-Agent and Accept-Encoding", "Which default headers?", [HEADERS], _idf)
    assert ev is not None and (ev.start_line, ev.end_line) == (43, 44)  # the docstring shares only "headers"
    assert ev.text.splitlines()[0].strip().startswith('"User-Agent"')
    long = EvidencePiece("c3", "t.py", 1, "\n".join(f"x_{i} = DEFAULT_VALUE" for i in range(20)))
    ev = find_evidence("DEFAULT_VALUE", "what?", [long], _idf)
    assert ev is not None and ev.end_line - ev.start_line + 1 == MAX_LINES


def test_an_answer_sharing_nothing_falls_back_to_the_questions_line_in_the_top_memory() -> None:
    ev = find_evidence("I do not know.", "What is ITER_CHUNK_SIZE?", [CONSTANTS, HEADERS], _idf)
    assert ev is not None and ev.text == "ITER_CHUNK_SIZE = 512"
    assert find_evidence("anything", "anything", [], _idf) is None


def test_rarer_terms_weigh_more() -> None:
    rare = {"connect": 5.0}  # retrieval terms are stemmed
    ev = find_evidence("User-Agent and Connection", "Which headers?", [HEADERS], lambda t: rare.get(t, 0.1))
    assert ev is not None and ev.text.strip().startswith('"Connection"')
