import math

import numpy as np
import pytest
import torch

from remem_ray.insight.expertness import expertness_score
from remem_ray.insight.information import mutual_information, teacher_information


def test_constant_output_carries_no_information():
    mi = mutual_information(torch.ones(200, 10), torch.randint(0, 5, (200,)), sigma=0.1)
    assert mi.i_xt_lower == pytest.approx(0.0, abs=1e-9) and mi.i_xt_upper == pytest.approx(0.0, abs=1e-9)
    assert mi.i_ty_kl == pytest.approx(0.0, abs=1e-9)


def test_well_separated_outputs_reach_log_n():
    n = 300
    outputs = torch.eye(n) * 100.0  # pairwise distance ~141, sigma 1
    labels = torch.arange(n) % 3
    mi = mutual_information(outputs, labels, sigma=1.0)
    assert mi.i_xt_lower == pytest.approx(math.log(n), rel=1e-6)
    assert mi.i_xt_upper == pytest.approx(math.log(n), rel=1e-6)
    assert mi.i_ty_kl == pytest.approx(math.log(3), rel=1e-6)  # I(T;Y) = H(Y) when classes are distinct


def test_noisier_channel_gives_less_and_bounds_are_ordered():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(500, 8, generator=g)
    labels = torch.randint(0, 4, (500,), generator=g)
    values = [mutual_information(outputs, labels, sigma) for sigma in (0.1, 0.5, 2.0, 8.0)]
    uppers = [v.i_xt_upper for v in values]
    assert uppers == sorted(uppers, reverse=True) and uppers[0] > uppers[-1] + 1.0
    for v in values:
        assert 0.0 <= v.i_xt_lower <= v.i_xt_upper <= math.log(500) + 1e-9


def test_batched_equals_unbatched():
    from remem_ray.insight.information import _mean_neg_log_mixture

    x = torch.randn(700, 5, generator=torch.Generator().manual_seed(1)).double()
    assert _mean_neg_log_mixture(x, 0.7, "kl", batch=64) == pytest.approx(
        _mean_neg_log_mixture(x, 0.7, "kl", batch=4096)
    )


def test_teacher_information_reports_targets_and_logits_fixed_and_relative():
    # logits close enough together for sigma 0.1 to blur them: at x 3 both read log N, the
    # ceiling (the comparison below passed by cdist's rounding, which made them differ)
    logits = torch.randn(400, 10, generator=torch.Generator().manual_seed(2)) * 0.03
    labels = logits.argmax(-1)
    info = teacher_information(logits, labels, temperature=4.0)
    assert set(info) == {"targets/fixed", "targets/relative", "logits/fixed", "logits/relative"}
    # the relative scale makes the estimate blind to a rescaling of the logits; the fixed one is not
    scaled = teacher_information(logits * 10, labels, temperature=4.0)
    assert scaled["logits/relative"]["i_xt_upper"] == pytest.approx(info["logits/relative"]["i_xt_upper"], rel=1e-6)
    assert scaled["logits/fixed"]["i_xt_upper"] > info["logits/fixed"]["i_xt_upper"]


def test_sigma_must_be_positive():
    with pytest.raises(ValueError, match="sigma"):
        mutual_information(torch.zeros(3, 2), None, 0.0)


def test_expert_neurons_score_clearly_higher_than_dense_ones():
    rng = np.random.default_rng(0)
    classes, per_class = 10, 20
    expert = np.zeros((classes * per_class, classes))
    for c in range(classes):  # each neuron fires for exactly one class
        expert[c * per_class : (c + 1) * per_class, c] = rng.uniform(1.0, 2.0, per_class)
    expert += rng.uniform(0, 0.05, expert.shape)
    dense = rng.uniform(0.0, 1.0, expert.shape)
    e, d = expertness_score(expert), expertness_score(dense)
    assert e > 0.8 and d < 0.4 and e > d + 0.5  # noise holds ~13 % of the expert mass off-block


def test_outputs_that_collapsed_never_read_above_log_n():
    """cdist's matrix-product form (its default above 25 rows) gave each point a distance to itself
    of about 1e-8, as large as any other between collapsed outputs: the relative estimate read 50
    nats for 512 of them, log 512 being 6.24 (a review's finding)."""
    same = torch.full((512, 10), 0.1)
    for view in teacher_information(same, torch.arange(512) % 10, temperature=4.0).values():
        assert view["i_xt_upper"] == pytest.approx(0.0, abs=1e-9)
    barely = same + 1e-7 * torch.randn(512, 10, generator=torch.Generator().manual_seed(0))
    for view in teacher_information(barely, torch.arange(512) % 10, temperature=4.0).values():
        assert view["i_xt_lower"] <= view["i_xt_upper"] <= math.log(512) + 1e-9


def test_the_headline_mi_reads_a_collapsed_teacher_as_empty_and_input_specific_outputs_as_full():
    """The relative estimate, the headline before, gave near-uniform targets that barely vary (an
    untrained teacher's) close to log N, more than any trained teacher (a review's finding)."""
    from remem_ray.contract import headline_mi

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 10
    collapsed = 0.01 * torch.randn(400, 10, generator=g)  # logits that barely vary
    classes = 12.0 * torch.nn.functional.one_hot(labels, 10).double()
    specific = classes + 3.0 * torch.randn(400, 10, generator=g).double()  # and each input its own
    assert teacher_information(collapsed, labels, 4.0)["targets/relative"]["i_xt_upper"] > 5.5  # why it was wrong
    assert headline_mi(teacher_information(collapsed, labels, 4.0)) < 0.01
    by_class = headline_mi(teacher_information(classes, labels, 4.0))
    assert by_class == pytest.approx(math.log(10), rel=1e-3)  # class identity only: log C
    assert headline_mi(teacher_information(specific, labels, 4.0)) > by_class + 1.0  # input-specific: more


def test_measuring_expertness_leaves_the_model_in_the_mode_it_was_in():
    from remem_ray.insight.expertness import neuron_by_class
    from remem_ray.models import create_model, normalizer_for

    model = create_model("vit_micro_patch4", 3, 16, {"depth": 1, "embed_dim": 16, "num_heads": 2}).train()
    images, labels = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    matrices = neuron_by_class(model, normalizer_for(model), [(images, labels)], 3, torch.device("cpu"))
    assert len(matrices) == 1 and model.training


def test_a_students_teacher_mi_follows_todays_headline_not_the_one_its_teacher_was_trained_under():
    """Teachers in a registry outlive a change of headline: a student reported the number its
    teacher had reported when trained (the relative estimate, before 2026-12-07), so a sweep's
    information plane could put both definitions on one axis (a review's finding)."""
    from remem_ray.contract import teacher_mi_of

    information = {"targets/fixed": {"i_xt_upper": 1.25}, "targets/relative": {"i_xt_upper": 6.2}}
    trained_before = {"metrics": {"teacher_mi": 6.2, "val_acc": 0.5}, "information": information}
    assert teacher_mi_of(trained_before) == 1.25
    assert teacher_mi_of({"metrics": {"teacher_mi": 0.7}}) == 0.7  # no family recorded: what it reported
    assert math.isnan(teacher_mi_of({"metrics": {}}))


def test_a_gated_mlps_expertness_reads_its_hidden_activity_not_its_gate():
    """In timm's gated MLPs (GluMlp: dinov2-giant, SwiGLU: aimv2) `mlp.act` outputs the gate
    alone; the hidden activity is act(gate) * value, the input of `mlp.fc2`. Equal at timm's init
    (the value half starts at 1), they part once trained: here fc1 is drawn at random."""
    import timm
    from timm.layers import SwiGLUPacked

    from remem_ray.insight.expertness import neuron_by_class

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        depth=1,
        embed_dim=32,
        num_heads=2,
        num_classes=2,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
    ).eval()
    torch.nn.init.normal_(model.blocks[0].mlp.fc1.weight)
    torch.nn.init.normal_(model.blocks[0].mlp.fc1.bias)
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 0, 1, 1])
    fed: list[torch.Tensor] = []
    model.blocks[0].mlp.fc2.register_forward_pre_hook(lambda m, inputs: fed.append(inputs[0].mean(dim=1)))
    (matrix,) = neuron_by_class(model, torch.nn.Identity(), [(images, labels)], 2, torch.device("cpu"))
    hidden = fed[0].double()
    expected = torch.stack([hidden[:2].mean(0), hidden[2:].mean(0)], dim=1).numpy()
    np.testing.assert_allclose(matrix, expected, rtol=1e-5, atol=1e-6)


def test_a_vit_whose_blocks_fold_patches_into_the_batch_has_no_expertness_not_a_crash():
    """mobilevit's transformer blocks see (batch x patch area, tokens, channels): the per-class
    sums raised a shape error, and `remem info` on such a checkpoint failed, its MI lost with it."""
    import timm

    from remem_ray.insight.expertness import neuron_by_class

    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=3).eval()
    batch = [(torch.rand(2, 3, 64, 64), torch.tensor([0, 1]))]
    with pytest.raises(TypeError, match="expertness needs a ViT"):
        neuron_by_class(model, torch.nn.Identity(), batch, 3, torch.device("cpu"))
