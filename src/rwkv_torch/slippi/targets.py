"""The controller: what the policy predicts each frame, its encoding as training targets and the decoding back to
a controller.

| head | kind | classes | from the replay (pre-frame) |
|---|---|---|---|
| ``buttons`` | 8 Bernoulli outputs | A B X Y Z L R D_UP | ``buttons_physical`` bits (what the player pressed) |
| ``main_x``, ``main_y`` | categorical | 17 | ``joystick`` x/y, processed, in [-1, 1] |
| ``c_x``, ``c_y`` | categorical | 17 | ``cstick`` x/y |
| ``shoulder`` | categorical | 5 | ``triggers``: processed analog shoulder in [0, 1] |

A stick axis has 16 buckets plus neutral, as ExPhil's: class 8 is neutral (|v| inside Melee's dead zone, 0.2875,
which the processed value already reads as 0), classes 9..16 split (0.2875, 1] into 8 equal buckets and 0..7
mirror them below zero. Decoding gives the bucket centre (0 for neutral). The shoulder classes are 5 equal buckets
of [0, 1] decoded to 0, 0.25, 0.5, 0.75, 1.

An autoregressive head (``train --controller-head autoregressive``, the default for replays) predicts them in
``HEAD_ORDER``: buttons, main stick, C-stick, shoulder, each conditioned on the ones before
(``task.model.CONTROLLER_ORDER``, the same order: the task layer does not import this package).
"""

import numpy as np

BUTTONS = ("A", "B", "X", "Y", "Z", "L", "R", "D_UP")
# buttons_physical bit of each button (Slippi pre-frame "physical buttons").
BUTTON_BITS = {"A": 0x0100, "B": 0x0200, "X": 0x0400, "Y": 0x0800, "Z": 0x0010, "L": 0x0040, "R": 0x0020,
               "D_UP": 0x0008}
STICKS = ("main_x", "main_y", "c_x", "c_y")
HEAD_ORDER = ("buttons", *STICKS, "shoulder")
STICK_CLASSES = 17
NEUTRAL = 8
DEADZONE = 0.2875
SHOULDER_CLASSES = 5
_EDGES = np.linspace(DEADZONE, 1.0, 9)  # bucket edges of |v| above the dead zone
STICK_VALUES = np.concatenate([-(_EDGES[:-1] + _EDGES[1:])[::-1] / 2, [0.0], (_EDGES[:-1] + _EDGES[1:]) / 2])
SHOULDER_VALUES = np.linspace(0.0, 1.0, SHOULDER_CLASSES)


def button_bits(buttons: np.ndarray) -> np.ndarray:
    """``buttons_physical`` ``[N]`` -> ``[N, 8]`` bool, in ``BUTTONS`` order."""
    b = buttons.astype(np.int64)
    return np.stack([(b & BUTTON_BITS[n]) != 0 for n in BUTTONS], axis=-1)


def stick_class(v: np.ndarray) -> np.ndarray:
    """Stick axis values in [-1, 1] -> class ids in [0, 17) (8 = neutral)."""
    v = np.clip(np.asarray(v, dtype=np.float64), -1.0, 1.0)
    mag = np.clip(np.searchsorted(_EDGES, np.abs(v), side="right") - 1, 0, 7)
    cls = np.where(v > 0, NEUTRAL + 1 + mag, NEUTRAL - 1 - mag)
    return np.where(np.abs(v) < DEADZONE - 1e-3, NEUTRAL, cls).astype(np.int64)


def shoulder_class(v: np.ndarray) -> np.ndarray:
    """Analog shoulder in [0, 1] -> class ids in [0, 5) (nearest of ``SHOULDER_VALUES``)."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0)
    return np.rint(v * (SHOULDER_CLASSES - 1)).astype(np.int64)


def controller_targets(cols: dict) -> dict:
    """The episode's ``target_*`` and ``classes_*`` arrays from one player's pre-frame columns (``[N]`` each)."""
    out = {"target_buttons": button_bits(cols["buttons"])}
    for head, col in zip(STICKS, ("stick_x", "stick_y", "cstick_x", "cstick_y")):
        out[f"target_{head}"] = stick_class(cols[col])
        out[f"classes_{head}"] = np.int64(STICK_CLASSES)
    out["target_shoulder"] = shoulder_class(cols["trigger"])
    out["classes_shoulder"] = np.int64(SHOULDER_CLASSES)
    return out
