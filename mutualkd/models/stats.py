"""Per-dataset pixel statistics (per-channel mean and std of [0, 1] pixels): the one set that both the data
pipeline's normalisation and the CIFAR zoo's default `pretrained_cfg` use."""

# Measured once over all pixels of the digits' 1,438-image train part (the fixed test split held out).
DIGITS_MEAN, DIGITS_STD = (0.3055,), (0.3759,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# RepDistiller's CIFAR-100 normalisation (the code behind the published tables, METHODS.md §5.5).
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
