"""The zoo's numbers in the paper's tables (Li & Yao, ICML 2024), and the parameter counts of the
reference implementation's models, which the zoo's models match exactly."""

from fractions import Fraction as F

#: model -> {budget (None: static): (params M, ImageNet top-1)} as the paper's tables give them
PAPER = {
    "resnet18": {None: (11.69, 70.44)},
    "resnet50": {None: (25.56, 78.44)},
    "kw_resnet18": {
        F(1, 4): (4.08, 72.73),
        F(1, 2): (7.43, 73.33),
        F(1): (11.93, 74.77),
        F(2): (23.24, 75.19),
        F(4): (45.86, 76.05),
    },
    "kw_resnet50": {F(1, 2): (17.64, 79.30), F(1): (28.05, 80.38), F(4): (102.02, 81.05)},
    "mobilenetv2_100": {None: (3.50, 72.04)},
    "mobilenetv2_050": {None: (1.97, 64.32)},
    "kw_mobilenetv2_100": {F(1, 2): (2.65, 72.59), F(1): (5.17, 74.68), F(4): (11.38, 75.92)},
    "kw_mobilenetv2_050": {F(1, 2): (1.47, 65.20), F(1): (2.85, 68.29), F(4): (4.65, 70.26)},
    "convnext_tiny": {None: (28.59, 82.07)},
    "kw_convnext_tiny": {F(1): (39.37, 82.51)},
}

#: model -> {budget: exact parameter count of the reference implementation's model}
REFERENCE_PARAMS = {
    "resnet18": {None: 11689512},
    "resnet50": {None: 25557032},
    "kw_resnet18": {F(1, 4): 4031768, F(1, 2): 7431044, F(1): 11932148, F(2): 23242127, F(4): 45862085},
    "kw_resnet50": {F(1, 2): 17638264, F(1): 28052310, F(4): 102015144},
    "mobilenetv2_100": {None: 3504872},
    "mobilenetv2_050": {None: 1968680},
    "kw_mobilenetv2_100": {F(1, 2): 2654396, F(1): 5168146, F(4): 11379382},
    "kw_mobilenetv2_050": {F(1, 2): 1466888, F(1): 2854522, F(4): 4648587},
    "convnext_tiny": {None: 28589128},
    "kw_convnext_tiny": {F(1): 39370674},
}
