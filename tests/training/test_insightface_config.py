"""arcface_torch config files (configs/*.py, in their published style, written here) read
without running them and mapped onto TrainConfig; everything else refused by line and key."""
import pytest

from ree.cli import _train_config, build_parser
from ree.config import TrainConfig
from ree.errors import ConfigError
from ree.insightface_config import InsightfaceConfigError, read_assignments, train_fields

HEADER = """from easydict import EasyDict as edict

# make training faster
# our RAM is 256G
# mount -t tmpfs -o size=140G  tmpfs /train_tmp

config = edict()
"""

GLINT_R100_COSFACE = HEADER + """config.margin_list = (1.0, 0.0, 0.4)
config.network = "r100"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/glint360k"
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = 1
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]
"""


def write(tmp_path, text, name="job.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_cosface_config_maps_onto_train_config(tmp_path):
    fields = train_fields(write(tmp_path, GLINT_R100_COSFACE), processes=8)
    per_epoch = 17091657 // (128 * 8)
    assert fields == {"arch": "r100", "input_size": None, "embedding_size": 512, "margin_mode": "cosface",
                      "margin": 0.4, "batch_size": 1024, "sample_rate": 1.0, "lr": 0.1, "weight_decay": 1e-4,
                      "momentum": 0.9, "optimizer": "sgd", "seed": 2048, "steps": 20 * per_epoch,
                      "warmup_steps": per_epoch}
    config = TrainConfig.from_dict(fields)
    assert (config.arch, config.margin_mode, config.model_config().resolved_input_size) == ("r100", "cosface", 112)


def test_an_arcface_config_with_base_values_and_adamw(tmp_path):
    text = HEADER + ('config.margin_list = (1.0, 0.5, 0.0)\nconfig.network = "r18"\nconfig.optimizer = "adamw"\n'
                     'config.lr = 0.001\nconfig.weight_decay = 0.1\nconfig.embedding_size = 256\n')
    fields = train_fields(write(tmp_path, text))
    assert (fields["arch"], fields["margin_mode"], fields["margin"]) == ("r18", "arcface_st", 0.5)
    assert (fields["optimizer"], fields["lr"], fields["weight_decay"], fields["embedding_size"]) == \
           ("adamw", 0.001, 0.1, 256)
    assert fields["batch_size"] == 128 and "steps" not in fields  # base.py's batch; no epochs given
    TrainConfig.from_dict(fields)


@pytest.mark.parametrize("line, message", [
    ('config.network = "mbf"', r"job.py:8: config.network = 'mbf': only arcface_torch's iResNets r18, r34"),
    ('config.network = "vit_t_dp005_mask0"', "config.network = 'vit_t_dp005_mask0'"),
    ("config.margin_list = (1.0, 0.5, 0.4)", "job.py:8: .*combined margin"),
    ("config.margin_list = (1.35, 0.0, 0.0)", "SphereFace"),
    ("config.margin_list = (1.0, 0.5)", "three numbers"),
    ("config.gradient_acc = 4", "job.py:8: config.gradient_acc = 4: not supported"),
    ("config.interclass_filtering_threshold = 0.4", "interclass_filtering_threshold"),
    ("config.loss_scale = 2", "job.py:8: config.loss_scale = 2: an arcface_torch key this mapping does not know"),
    ("config.num_epoch = 20", "config.num_epoch = 20: epochs become steps through config.num_image"),
    ("config.batch_size = 0", "batch_size"),
])
def test_what_cannot_be_mapped_is_refused_by_line_and_key(tmp_path, line, message):
    with pytest.raises(InsightfaceConfigError, match=message):
        train_fields(write(tmp_path, HEADER + line + "\n"))


def test_arithmetic_on_numbers_and_earlier_values_is_read_by_walking_the_tree(tmp_path):
    text = HEADER + ("config.num_epoch = 20\nconfig.warmup_epoch = config.num_epoch // 10\n"
                     "config.num_classes = 30 * 10000\nconfig.lr = -(-0.4 / 4) + 0.0\n")
    values = {k: v for k, (v, _) in read_assignments(write(tmp_path, text)).items()}
    assert values == {"num_epoch": 20, "warmup_epoch": 2, "num_classes": 300000, "lr": 0.1}


@pytest.mark.parametrize("line", [
    "import os",
    "config.lr = config.base_lr * 4",
    "config.lr = 'a' * 4",
    "config.lr = 2 ** 40",
    "config.output = os.path.join('work_dirs', 'x')",
    "config.network = get_network()",
    "print('hello')",
    "for k in range(3): pass",
    "config = dict()",
    "from easydict import EasyDict",
    "cfg.lr = 0.1",
])
def test_only_literal_assignments_are_read_never_run(tmp_path, line):
    path = write(tmp_path, HEADER + line + "\n")
    with pytest.raises(InsightfaceConfigError, match="job.py:8: "):
        read_assignments(path)


def test_a_file_is_never_executed(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path, HEADER + f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(InsightfaceConfigError):
        read_assignments(path)
    assert not marker.exists()
    with pytest.raises(InsightfaceConfigError, match="cannot read"):
        read_assignments(write(tmp_path, "config.lr = (", "broken.py"))


def test_partial_fc_sampling_is_read_into_the_config(tmp_path):
    fields = train_fields(write(tmp_path, GLINT_R100_COSFACE.replace("sample_rate = 1.0", "sample_rate = 0.2")))
    assert fields["sample_rate"] == 0.2
    assert TrainConfig.from_dict(fields).sample_rate == 0.2
    with pytest.raises(ValueError, match="sample_rate must lie in"):
        TrainConfig.from_dict({**fields, "sample_rate": 0.0})


def test_ree_train_insightface_config_flags_override_it(tmp_path):
    path = write(tmp_path, GLINT_R100_COSFACE)
    parser = build_parser()
    args = parser.parse_args(["train", "--insightface-config", str(path), "--steps", "5", "--nproc", "2"])
    config, _ = _train_config(args)
    assert (config.arch, config.margin_mode, config.margin, config.batch_size, config.steps) == \
           ("r100", "cosface", 0.4, 256, 5)
    args = parser.parse_args(["train", "--insightface-config", str(write(tmp_path, HEADER + "import os\n", "b.py"))])
    with pytest.raises(ConfigError, match="b.py:8: only `config.<name> = <value>` lines"):
        _train_config(args)
