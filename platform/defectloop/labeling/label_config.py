"""The Label Studio label config defectloop works with: build it, and read the names out of it.

Predictions and annotations refer to tags by name (``from_name``/``to_name``), so everything that
talks to a project reads them from its config instead of assuming ours.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

NORMAL, ANOMALOUS = "normal", "anomalous"
#: the brush label of a predicted mask whose type the banks do not know
GENERIC_DEFECT = "defect"


@dataclass(frozen=True)
class LabelConfig:
    """Tag names of an anomaly-labeling project."""

    image: str  # <Image name=...>
    image_key: str  # the task data field holding the image URL ($image -> "image")
    brush: str | None  # <BrushLabels name=...>
    defects: tuple[str, ...]  # its <Label value=...>s
    choices: str | None  # <Choices name=...> for the image-level verdict
    choice_values: tuple[str, ...]

    @classmethod
    def parse(cls, xml: str) -> LabelConfig:
        """Read the tags; a clear error tells the user what the config lacks."""
        try:
            root = ET.fromstring(xml)
        except ET.ParseError as e:
            raise ValueError(f"label config is not valid XML: {e}") from e
        images = [el for el in root.iter() if el.tag == "Image"]
        if not images:
            raise ValueError("label config has no <Image> tag: add <Image name=\"image\" value=\"$image\"/>")
        image = images[0]
        value = image.get("value", "")
        if not value.startswith("$"):
            raise ValueError(f"<Image name={image.get('name')!r}> must read a task field, e.g. value=\"$image\"")
        brush = next((el for el in root.iter() if el.tag == "BrushLabels"
                      and el.get("toName") == image.get("name")), None)
        choices = next((el for el in root.iter() if el.tag == "Choices"
                        and el.get("toName") == image.get("name")), None)
        if brush is None and choices is None:
            raise ValueError("label config needs <BrushLabels> (defect masks) or <Choices> (normal/anomalous) "
                             f"with toName={image.get('name')!r}")
        return cls(
            image=image.get("name", "image"), image_key=value[1:],
            brush=None if brush is None else brush.get("name"),
            defects=() if brush is None else tuple(el.get("value", "") for el in brush if el.tag == "Label"),
            choices=None if choices is None else choices.get("name"),
            choice_values=() if choices is None else tuple(el.get("value", "") for el in choices if el.tag == "Choice"))

    def defect_label(self, preferred: str | None = None) -> str | None:
        """The brush label a mask carries: ``preferred`` (a defect type) if the config has it, else the
        generic one, else the first (a config of someone else's without the generic label)."""
        for label in (preferred, GENERIC_DEFECT):
            if label in self.defects:
                return label
        return self.defects[0] if self.defects else None


def prediction_regions(config: LabelConfig, task_id: object, score: float, anomalous: bool,
                       mask_rle: list[int] | None, width: int, height: int, defect: str | None = None) -> list[dict]:
    """Prediction regions of one task in the project's own tag names: the predicted mask as a brush
    region (when there is one), labeled ``defect`` where known, and the normal/anomalous verdict
    (when the config has Choices)."""
    out = []
    label = config.defect_label(defect)
    if config.brush and label and mask_rle:
        out.append({"id": f"dl-{task_id}-mask", "from_name": config.brush, "to_name": config.image,
                    "type": "brushlabels", "origin": "prediction",
                    "value": {"format": "rle", "rle": mask_rle, "brushlabels": [label]},
                    "original_width": width, "original_height": height, "image_rotation": 0, "score": score})
    verdict = ANOMALOUS if anomalous else NORMAL
    if config.choices and verdict in config.choice_values:
        out.append({"id": f"dl-{task_id}-verdict", "from_name": config.choices, "to_name": config.image,
                    "type": "choices", "value": {"choices": [verdict]}, "score": score})
    return out


def build_label_config(defects: list[str] | tuple[str, ...] = (GENERIC_DEFECT,)) -> str:
    """Image + BrushLabels (one label per defect type, and the generic one) + Choices normal/anomalous."""
    if not defects:
        raise ValueError("at least one defect label is needed")
    defects = list(dict.fromkeys([*defects, GENERIC_DEFECT]))
    labels = "\n".join(f"    <Label value={quoteattr(d)}/>" for d in defects)
    return f"""<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="defect" toName="image">
{labels}
  </BrushLabels>
  <Choices name="verdict" toName="image" choice="single" showInline="true">
    <Choice value="{NORMAL}"/>
    <Choice value="{ANOMALOUS}"/>
  </Choices>
</View>"""
