def test_stand_in_probes_ask_about_someone_else_and_keep_the_answer():
    from atu.evaluation.probes import stand_in_probes
    from atu.formats import Concept, ConceptSet, Probe

    cs = ConceptSet([Concept("Ada Moss", aliases=("Moss", "A. Moss"))])
    probes = [
        Probe("Ada Moss", "direct", "Where was Ada Moss born?", "Selford", "birthplace"),
        Probe("Ada Moss", "adversarial", "Fill in: A. Moss won ___.", "the Medal", "award"),
        Probe("Ada Moss", "adversarial", "Who is married to Cy Dunn?", "Ada Moss", "spouse"),  # does not name her
        Probe("Ada Moss", "paraphrase", "Mossy Moss?", "x"),
    ]
    out = stand_in_probes(probes, cs, ["Bo Li", "Eve Ray"])
    assert [p.question for p in out] == [
        "Where was Bo Li born?",
        "Where was Eve Ray born?",
        "Fill in: Bo Li won ___.",  # the longest surface form is replaced whole
        "Fill in: Eve Ray won ___.",
        "Mossy Bo Li?",
        "Mossy Eve Ray?",
    ]
    assert {p.answer for p in out[:2]} == {"Selford"} and out[2].kind == "adversarial"
