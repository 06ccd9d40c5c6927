"""Vision models: ResNet-18 parity with a PyTorch ResNet, graph == eager, LeNet learns the digits,
every model trains a step at a tiny size, bad configs are refused."""

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu import data, models


@pytest.fixture(autouse=True)
def _one_thread():
    """Small kernels run faster on one thread than on two on a shared CPU (OpenMP barriers spin
    when the cores are oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TorchBasicBlock(torch.nn.Module):
    """torchvision's BasicBlock, written out (He et al. 2016, option B shortcuts)."""

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, width, 1, stride, bias=False),
                                                  torch.nn.BatchNorm2d(width))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet18(torch.nn.Module):
    def __init__(self, num_classes, width, stem):
        super().__init__()
        if stem == "cifar":
            self.conv1 = torch.nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = torch.nn.Identity()
        else:
            self.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
        self.bn1 = torch.nn.BatchNorm2d(width)
        cin = width
        for i in range(4):
            w = width * 2 ** i
            setattr(self, f"layer{i + 1}", torch.nn.Sequential(TorchBasicBlock(cin, w, 2 if i else 1),
                                                               TorchBasicBlock(w, w, 1)))
            cin = w
        self.fc = torch.nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _pair(stem, width=8, seed=0):
    ls.manual_seed(seed)
    ours = models.resnet18(num_classes=7, width=width, stem=stem).to(dtype="float64")
    ref = TorchResNet18(7, width, stem).double()
    ref.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in ours.state_dict().items()})
    return ours, ref


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_resnet18_matches_pytorch(stem):
    ours, ref = _pair(stem)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32))
    out = ours(ls.tensor(x))  # training mode: batch statistics
    tout = ref(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-5, atol=1e-8)
    labels = np.array([0, 3, 6])
    ls.nn.functional.cross_entropy(out, ls.tensor(labels)).backward()
    torch.nn.functional.cross_entropy(tout, torch.from_numpy(labels)).backward()
    tparams = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), tparams[name].grad.numpy(), rtol=1e-5, atol=1e-9,
                                   err_msg=name)
    for name, b in ref.named_buffers():  # running statistics moved alike
        np.testing.assert_allclose(ours.state_dict()[name].numpy(), b.numpy(), rtol=1e-6, atol=1e-9,
                                   err_msg=name)
    ours.eval()
    ref.eval()
    np.testing.assert_allclose(ours(ls.tensor(x)).numpy(), ref(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_full_width_resnet18_matches_pytorch_in_float32():
    ls.manual_seed(0)
    ours = models.resnet18(num_classes=10)
    ref = TorchResNet18(10, 64, "cifar")
    ref.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in ours.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    out, tout = ours(ls.tensor(x)), ref(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    tout.sum().backward()
    np.testing.assert_allclose(ours.conv1.weight.grad.numpy(), ref.conv1.weight.grad.numpy(), rtol=1e-3, atol=1e-4)


def test_resnet_graph_matches_eager_through_a_training_step():
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    y = np.array([0, 1, 2, 3])

    def step_eager():
        ls.manual_seed(3)
        model = models.resnet18(num_classes=4, width=4)
        opt = ls.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for _ in range(2):
            loss = ls.nn.functional.cross_entropy(model(ls.tensor(x)), ls.tensor(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, model

    eager, eager_model = step_eager()
    ls.manual_seed(3)
    model = models.resnet18(num_classes=4, width=4)
    opt = ls.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ls.Graph() as g:
        xp = ls.placeholder("x", (None, 3, 16, 16))
        yp = ls.placeholder("y", (None,), "int64")
        loss = ls.nn.functional.cross_entropy(model(xp), yp)
        train = opt.minimize(loss)
    graph = [float(g.run([loss, train], {xp: x, yp: y})[0]) for _ in range(2)]
    np.testing.assert_allclose(graph, eager, rtol=1e-5)
    ours = dict(model.state_dict())
    for name, t in eager_model.state_dict().items():
        if name.endswith("num_batches_tracked"):  # counted in eager mode only (see BatchNorm2d)
            continue
        np.testing.assert_allclose(ours[name].numpy(), t.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def _digits_split():
    x, y = data.load_digits(images=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order][:, None], y[order]
    x = (x - x[:1400].mean()) / x[:1400].std()  # standardised with the training split's statistics
    return x[:1400], y[:1400], x[1400:], y[1400:]


def test_lenet_learns_the_digits():
    """Seeds 0-4 reach 96.5-99.2% test accuracy in these 12 epochs (about 260 steps)."""
    xtr, ytr, xte, yte = _digits_split()
    ls.manual_seed(0)
    model = models.LeNet(models.LeNetConfig(in_channels=1, num_classes=10, image_size=8))
    epochs, batch = 12, 64
    opt = ls.optim.Adam(model.parameters(), lr=5e-3)
    schedule = ls.optim.CosineAnnealingLR(opt, T_max=epochs * (len(xtr) // batch))
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 1, 8, 8))
        y = ls.placeholder("y", (None,), "int64")
        logits = model(x)
        loss = ls.nn.functional.cross_entropy(logits, y)
        train = opt.minimize(loss)
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = rng.permutation(len(xtr))
        for b in range(0, len(order) - batch + 1, batch):
            g.run([loss, train], {x: xtr[order[b:b + batch]], y: ytr[order[b:b + batch]]})
            schedule.step()
    accuracy = float((g.run(logits, {x: xte}).argmax(1) == yte).mean())
    print(f"LeNet digits test accuracy {accuracy:.3f}")
    assert accuracy >= 0.95, f"LeNet digits test accuracy {accuracy:.3f}"


TINY = [
    ("mlp", dict(in_features=48, hidden=(16, 8), num_classes=5, dropout=0.1), (2, 3, 4, 4)),
    ("lenet", dict(in_channels=1, num_classes=5, image_size=8), (2, 1, 8, 8)),
    ("lenet", dict(in_channels=3, num_classes=5, image_size=28, activation="tanh"), (2, 3, 28, 28)),
    ("alexnet", dict(num_classes=5, hidden=16), (2, 3, 32, 32)),
    ("alexnet", dict(num_classes=5, hidden=16, image_size=64, in_channels=1), (2, 1, 64, 64)),
    ("vgg16", dict(num_classes=5, hidden=16, width=4), (2, 3, 32, 32)),
    ("vgg16", dict(num_classes=5, hidden=16, width=4, batch_norm=False, image_size=64), (2, 3, 64, 64)),
    ("resnet", dict(depth=34, num_classes=5, width=2), (2, 3, 16, 16)),
    ("resnet50", dict(num_classes=5, width=2, stem="imagenet"), (2, 3, 32, 32)),
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), TINY)
def test_every_vision_model_trains_a_step(name, kwargs, shape):
    ls.manual_seed(0)
    model = models.build(name, **kwargs)
    opt = ls.optim.SGD(model.parameters(), lr=0.01)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    before = [p.numpy().copy() for p in model.parameters()]
    out = model(ls.tensor(x))
    assert out.shape == (2, 5)
    ls.nn.functional.cross_entropy(out, ls.tensor(np.array([0, 4]))).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert any(not np.array_equal(b, p.numpy()) for b, p in zip(before, model.parameters()))


def test_resnet_helpers_and_torchvision_layout():
    model = models.resnet50(num_classes=3, width=2)
    assert model.config.depth == 50 and isinstance(model.layer1[0], models.Bottleneck)
    names = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer4.2.bn3.bias",
            "fc.weight"} <= names
    assert len(models.resnet34(width=2).layer3) == 6
    # 11.17M parameters in torchvision's ResNet-18 with 10 classes and the 3x3 stem
    assert sum(p.numpy().size for p in models.resnet18().parameters()) == 11_173_962


@pytest.mark.parametrize(("config", "kwargs", "match"), [
    (models.ResNetConfig, dict(depth=20), "depth must be one of"),
    (models.ResNetConfig, dict(stem="tiny"), "stem must be"),
    (models.MLPConfig, dict(hidden=(8, 0)), "hidden must be positive"),
    (models.MLPConfig, dict(dropout=1.5), "dropout"),
    (models.LeNetConfig, dict(image_size=2), "image_size must be >= 4"),
    (models.VGG16Config, dict(image_size=16), "image_size must be >= 32"),
    (models.AlexNetConfig, dict(num_classes=0), "num_classes must be a positive int"),
])
def test_bad_configs_are_refused(config, kwargs, match):
    with pytest.raises(ls.Error, match=match):
        config(**kwargs)


def test_wrong_input_shape_is_refused():
    model = models.LeNet(models.LeNetConfig(image_size=8))
    with pytest.raises(ls.Error, match=r"expected 8x8 images"):
        model(ls.tensor(np.zeros((2, 1, 28, 28), np.float32)))
    with pytest.raises(ls.Error, match=r"\(batch, 3, height, width\)"):
        models.resnet18(width=2)(ls.tensor(np.zeros((2, 1, 8, 8), np.float32)))
    with pytest.raises(ls.Error, match="expected 64 features"):
        models.MLP(models.MLPConfig(in_features=64))(ls.tensor(np.zeros((2, 65), np.float32)))


# --- MLP, LeNet, AlexNet, VGG-16 against PyTorch references written from torchvision's layouts, float64 ----

def _torch_lenet(cin, classes, size):
    half = size // 2
    pad2 = 0 if half >= 10 else 2
    out = (half + 2 * pad2 - 4) // 2
    nn = torch.nn
    return nn.ModuleDict({
        "features": nn.Sequential(nn.Conv2d(cin, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2)),
        "classifier": nn.Sequential(nn.Flatten(), nn.Linear(16 * out * out, 120), nn.ReLU(), nn.Linear(120, 84),
                                    nn.ReLU(), nn.Linear(84, classes))})


def _torch_alexnet_cifar(cin, classes, hidden):
    nn = torch.nn
    return nn.ModuleDict({
        "features": nn.Sequential(nn.Conv2d(cin, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        "avgpool": nn.AdaptiveAvgPool2d((2, 2)),
        "classifier": nn.Sequential(nn.Dropout(0.0), nn.Linear(256 * 4, hidden), nn.ReLU(), nn.Dropout(0.0),
                                    nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))})


def _torch_vgg16_bn(classes, hidden, width):
    nn = torch.nn
    layers, c = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(c, v * width // 64, 3, padding=1), nn.BatchNorm2d(v * width // 64), nn.ReLU()]
        c = v * width // 64
    return nn.ModuleDict({"features": nn.Sequential(*layers), "avgpool": nn.AdaptiveAvgPool2d((1, 1)),
                          "classifier": nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Dropout(0.0),
                                                      nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.0),
                                                      nn.Linear(hidden, classes))})


def _run_torch(ref, x):
    if "avgpool" in ref:
        return ref["classifier"](torch.flatten(ref["avgpool"](ref["features"](x)), 1))
    if "layers" in ref:
        return ref["layers"](x)
    return ref["classifier"](ref["features"](x))


@pytest.mark.parametrize(("name", "kwargs", "shape", "reference"), [
    ("mlp", dict(in_features=48, hidden=(16, 8), num_classes=5), (3, 3, 4, 4),
     lambda: torch.nn.ModuleDict({"layers": torch.nn.Sequential(
         torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
         torch.nn.Linear(8, 5))})),
    ("lenet", dict(in_channels=1, num_classes=5, image_size=8), (3, 1, 8, 8), lambda: _torch_lenet(1, 5, 8)),
    ("lenet", dict(in_channels=2, num_classes=4, image_size=28), (2, 2, 28, 28), lambda: _torch_lenet(2, 4, 28)),
    ("alexnet", dict(num_classes=5, hidden=16, dropout=0.0), (2, 3, 32, 32), lambda: _torch_alexnet_cifar(3, 5, 16)),
    ("vgg16", dict(num_classes=5, hidden=16, width=4, dropout=0.0), (3, 3, 32, 32),
     lambda: _torch_vgg16_bn(5, 16, 4)),
])
def test_vision_models_match_pytorch_forward_and_every_gradient(name, kwargs, shape, reference):
    """Beyond shapes: the same weights give torch's outputs and every parameter's gradient (train mode:
    batch norm uses the batch's statistics), in float64."""
    ls.manual_seed(3)
    model = models.build(name, **kwargs).to(dtype="float64")
    ref = reference().double()
    ref.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in model.state_dict().items()},
                        strict=False)  # torch's BatchNorm also counts batches (num_batches_tracked)
    assert {k for k, _ in ref.named_parameters()} == {k for k, _ in model.named_parameters()}
    x = np.random.default_rng(4).standard_normal(shape)
    out, tout = model(ls.tensor(x)), _run_torch(ref, torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-10, atol=1e-10)
    cot = np.random.default_rng(5).standard_normal(tuple(tout.shape))
    (out * ls.tensor(cot)).sum().backward()
    (tout * torch.from_numpy(cot)).sum().backward()
    theirs = dict(ref.named_parameters())
    for key, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), theirs[key].grad.numpy(), rtol=1e-9, atol=1e-10,
                                   err_msg=f"{name}: {key}")


class TorchBottleneck(torch.nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride on the 3x3 conv), expansion 4."""

    def __init__(self, cin, width, stride):
        super().__init__()
        out = width * 4
        self.conv1, self.bn1 = torch.nn.Conv2d(cin, width, 1, bias=False), torch.nn.BatchNorm2d(width)
        self.conv2, self.bn2 = torch.nn.Conv2d(width, width, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(width)
        self.conv3, self.bn3 = torch.nn.Conv2d(width, out, 1, bias=False), torch.nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, out, 1, stride, bias=False),
                                                  torch.nn.BatchNorm2d(out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def test_resnet50_bottlenecks_match_pytorch_forward_and_every_gradient():
    """ResNet-50 (3-4-6-3 bottlenecks, ImageNet stem) at width 2 against torchvision's layout, float64."""
    ls.manual_seed(0)
    ours = models.build("resnet50", num_classes=5, width=2, stem="imagenet").to(dtype="float64")
    nn = torch.nn
    ref = nn.Module()
    ref.conv1, ref.bn1 = nn.Conv2d(3, 2, 7, 2, 3, bias=False), nn.BatchNorm2d(2)
    cin = 2
    for i, blocks in enumerate((3, 4, 6, 3)):
        w = 2 * 2 ** i
        layer = [TorchBottleneck(cin, w, 2 if i else 1)] + [TorchBottleneck(w * 4, w, 1) for _ in range(blocks - 1)]
        setattr(ref, f"layer{i + 1}", nn.Sequential(*layer))
        cin = w * 4
    ref.fc = nn.Linear(cin, 5)
    ref.double().load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in ours.state_dict().items()})

    def run(x):
        x = nn.functional.max_pool2d(torch.relu(ref.bn1(ref.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(ref, f"layer{i}")(x)
        return ref.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32))
    out, tout = ours(ls.tensor(x)), run(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-8, atol=1e-9)
    cot = np.random.default_rng(2).standard_normal(tuple(tout.shape))
    (out * ls.tensor(cot)).sum().backward()
    (tout * torch.from_numpy(cot)).sum().backward()
    theirs = dict(ref.named_parameters())
    assert set(theirs) == {k for k, _ in ours.named_parameters()}
    for key, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), theirs[key].grad.numpy(), rtol=1e-7, atol=1e-8, err_msg=key)
