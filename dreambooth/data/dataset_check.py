"""The dataset check: what is wrong with the pictures, before an hour of training.

``python -m dreambooth check CONFIG.json`` prints the report (``--json`` for the machine form) and
exits 1 when training could not start (missing folder, no pictures, unreadable files, invalid
options), 0 otherwise; the tab shows the same report.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dreambooth.common.config import ConfigError, TrainingConfig
from dreambooth.data import (FILEWORDS, UNRESOLVED_RESOLUTION, DatasetError, background_color,
                             bucket_for, caption_for, file_hash, guess_identifier, has_alpha,
                             identifier_report, list_pictures, mask_for, open_mask, oriented_size,
                             prompt_token_limit, read_caption, scan_folder, token_length)
from dreambooth.data.masks import is_blank

# Short-side ranges for the size distribution (px).
SIZE_RANGES = ((0, 256, "< 256"), (256, 512, "256-511"), (512, 768, "512-767"),
               (768, 1024, "768-1023"), (1024, 10 ** 9, ">= 1024"))
FEW_DREAMBOOTH_PICTURES = 5
FEW_NATIVE_PICTURES = 100  # the seed: native training wants roughly 100 to 10000 pictures
LIST_LIMIT = 10  # names shown per finding in the text report
CAMERA_EXIF_TAGS = (0x010F, 0x0110)  # Make, Model: a camera took it, the model did not


@dataclass
class FolderReport:
    field: str  # e.g. "concepts[0].instance_data_dir"
    folder: str
    exists: bool = False
    pictures: int = 0
    undecodable: list[str] = field(default_factory=list)  # "name (reason)"
    size_ranges: dict[str, int] = field(default_factory=dict)  # short side -> count
    orientation: dict[str, int] = field(default_factory=dict)  # landscape / portrait / square
    smallest: list[int] = field(default_factory=list)  # [w, h] of the fewest pixels
    median_short_side: int = 0
    below_resolution: list[str] = field(default_factory=list)  # would be upscaled
    transparent: list[str] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)  # groups of identical files
    buckets: dict[str, int] = field(default_factory=dict)  # "WxH" -> pictures
    captions_used: bool = False
    captions_found: int = 0
    captions_missing: list[str] = field(default_factory=list)
    captions_not_utf8: list[str] = field(default_factory=list)
    captions_empty: list[str] = field(default_factory=list)
    prompts_too_long: list[str] = field(default_factory=list)  # "name: N tokens"
    camera_pictures: list[str] = field(default_factory=list)  # class folder: real photos?
    masks_used: bool = False  # masked training is on (instance folders)
    masks_found: int = 0
    masks_missing: list[str] = field(default_factory=list)  # trained on the whole picture
    masks_empty: list[str] = field(default_factory=list)  # all black: only the background weight
    masks_bad: list[str] = field(default_factory=list)  # "name (reason)": unreadable, other size


@dataclass
class ConceptReport:
    index: int
    instance_prompt: str
    class_prompt: str
    instance: FolderReport
    class_folder: FolderReport | None = None
    class_wanted: int = 0
    class_missing: int = 0  # generated before training
    identifier: dict | None = None


@dataclass
class DatasetReport:
    concepts: list[ConceptReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # training cannot start
    warnings: list[str] = field(default_factory=list)  # it can, but the result may suffer
    instance_pictures: int = 0
    total_steps: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def to_text(self) -> str:
        lines: list[str] = []
        for concept in self.concepts:
            lines.append(f"concept {concept.index}: {concept.instance_prompt!r}"
                         + (f" (class {concept.class_prompt!r})" if concept.class_prompt else ""))
            lines += _folder_lines(concept.instance)
            if concept.identifier:
                ident = concept.identifier
                lines.append(f"  identifier: {ident['message']}"
                             + (f" (try: {', '.join(ident['suggestions'])})"
                                if ident.get("suggestions") else ""))
            if concept.class_folder is not None:
                lines += _folder_lines(concept.class_folder)
                lines.append(f"  class pictures: {concept.class_folder.pictures} of "
                             f"{concept.class_wanted} wanted"
                             + (f", {concept.class_missing} will be generated before training"
                                if concept.class_missing else ""))
            lines.append("")
        lines.append(f"instance pictures: {self.instance_pictures}; training steps: "
                     f"{self.total_steps}")
        if self.warnings:
            lines.append("")
            lines.append("warnings:")
            lines += [f"  - {w}" for w in self.warnings]
        if self.errors:
            lines.append("")
            lines.append("errors (training cannot start):")
            lines += [f"  - {e}" for e in self.errors]
        lines.append("")
        lines.append("dataset OK" if self.ok else f"{len(self.errors)} error(s)")
        return "\n".join(lines)


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:LIST_LIMIT])
    return shown + (f" ... (+{len(items) - LIST_LIMIT})" if len(items) > LIST_LIMIT else "")


def _folder_lines(report: FolderReport) -> list[str]:
    lines = [f"  {report.field}: {report.folder}"]
    if not report.exists:
        return lines + ["    missing"]
    lines.append(f"    pictures: {report.pictures}"
                 + (f", unreadable: {len(report.undecodable)}" if report.undecodable else ""))
    if report.pictures:
        ranges = ", ".join(f"{k}: {v}" for k, v in report.size_ranges.items() if v)
        shapes = ", ".join(f"{k}: {v}" for k, v in report.orientation.items() if v)
        lines.append(f"    short side (px): {ranges}; median {report.median_short_side}; "
                     f"smallest {report.smallest[0]}x{report.smallest[1]}")
        lines.append(f"    shapes: {shapes}")
        lines.append("    buckets: " + ", ".join(f"{k}: {v}" for k, v in report.buckets.items()))
    findings = [
        ("unreadable", report.undecodable),
        ("smaller than their bucket (upscaled, will look soft)", report.below_resolution),
        ("transparent (composited on the background colour)", report.transparent),
        ("identical files", [" = ".join(group) for group in report.duplicates]),
        ("caption missing", report.captions_missing if report.captions_used else []),
        ("caption not UTF-8 (read as Windows-1252)", report.captions_not_utf8),
        ("caption empty", report.captions_empty),
        ("prompt over 75 tokens (read in chunks)", report.prompts_too_long),
        ("taken by a camera", report.camera_pictures),
        ("no mask (whole picture trained)", report.masks_missing),
        ("mask all black", report.masks_empty),
        ("mask unusable", report.masks_bad),
    ]
    if report.masks_used:
        lines.append(f"    masks: {report.masks_found} of {report.pictures}")
    if report.captions_found or report.captions_used:
        lines.append(f"    caption files: {report.captions_found} of {report.pictures}"
                     + ("" if report.captions_used else " (not used: no [filewords] in the "
                                                        "prompt)"))
    for title, items in findings:
        if items:
            lines.append(f"    {title}: {_names(items)}")
    return lines


def _check_mask(report: FolderReport, picture: Path, name: str, size: tuple[int, int],
                source: str) -> None:
    """Whether the picture has a usable mask (see data.mask_for), recorded in the report."""
    try:
        found = mask_for(picture, source)
        if found is None:
            report.masks_missing.append(name)
            return
        mask = open_mask(found, source, size)
        with Image.open(found) as image:
            own_size = oriented_size(image)
    except Exception as exc:  # an unreadable mask file
        report.masks_bad.append(f"{name} ({type(exc).__name__}: {exc})")
        return
    report.masks_found += 1
    if own_size != size:
        report.masks_bad.append(f"{found.name} ({own_size[0]}x{own_size[1]}, the picture is "
                                f"{size[0]}x{size[1]}: stretched to fit)")
    if is_blank(mask):  # read as training reads it: a near-black 16-bit mask is black here too
        report.masks_empty.append(found.name)


def _size_range(short_side: int) -> str:
    return next(label for low, high, label in SIZE_RANGES if low <= short_side < high)


def _is_transparent(path: Path) -> bool:
    with Image.open(path) as image:  # the header is enough
        return has_alpha(image)


def _has_camera_exif(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            exif = image.getexif()
            return any(exif.get(tag) for tag in CAMERA_EXIF_TAGS)
    except Exception:
        return False


def check_folder(folder_value: str, field_name: str, config: TrainingConfig, template: str,
                 *, tokenizer=None, recursive: bool = False, captions_used: bool = False,
                 limit: int | None = None, hashes: dict[str, list[str]] | None = None,
                 masks_used: bool = False) -> FolderReport:
    """Everything the report says about one folder. ``hashes`` collects file hashes across
    folders (content hash -> "field: name") to find the same picture in two places."""
    folder = Path(folder_value).expanduser()
    report = FolderReport(field_name, str(folder), exists=bool(folder_value) and folder.is_dir())
    report.captions_used = captions_used
    report.masks_used = masks_used
    if not report.exists:
        return report
    paths = list_pictures(folder, recursive=recursive)
    if limit is not None:
        paths = paths[:limit]
    scan = scan_folder(folder, paths=paths)
    report.undecodable = [str(bad) for bad in scan.bad]
    report.pictures = len(scan.sizes)
    report.size_ranges = {label: 0 for _, _, label in SIZE_RANGES}
    report.orientation = {"landscape": 0, "portrait": 0, "square": 0}
    buckets: Counter[str] = Counter()
    by_hash: dict[str, list[str]] = defaultdict(list)
    limit_tokens = prompt_token_limit(tokenizer) if tokenizer is not None else None
    native = not config.with_prior_preservation
    for path, (width, height) in scan.sizes.items():
        name = path.relative_to(folder).as_posix()
        report.size_ranges[_size_range(min(width, height))] += 1
        shape = "square" if width == height else ("landscape" if width > height else "portrait")
        report.orientation[shape] += 1
        bucket = bucket_for((width, height), config)
        buckets[f"{bucket[0]}x{bucket[1]}"] += 1
        if max(bucket[0] / width, bucket[1] / height) > 1:  # it would be upscaled
            report.below_resolution.append(f"{name} ({width}x{height})")
        try:
            if _is_transparent(path):
                report.transparent.append(name)
        except Exception:
            pass
        digest = file_hash(path)
        by_hash[digest].append(name)
        if hashes is not None:
            hashes.setdefault(digest, []).append(f"{field_name}: {name}")
        caption = read_caption(path, config.caption_extension)
        if caption.text is None:
            report.captions_missing.append(name)
        else:
            report.captions_found += 1
            if caption.encoding == "cp1252":
                report.captions_not_utf8.append(caption.path.name)
            if not caption.text:
                report.captions_empty.append(caption.path.name)
        if masks_used:
            _check_mask(report, path, name, (width, height), config.mask_source)
        if limit_tokens is not None:
            prompt = caption_for(path, template, caption_extension=config.caption_extension,
                                 prefer_caption_file=native and captions_used)
            length = token_length(prompt, tokenizer)
            if length > limit_tokens:
                report.prompts_too_long.append(f"{name}: {length} tokens")
    report.buckets = dict(sorted(buckets.items(), key=lambda item: -item[1]))
    report.duplicates = [names for names in by_hash.values() if len(names) > 1]
    if scan.sizes:
        sizes = list(scan.sizes.values())
        report.smallest = list(min(sizes, key=lambda s: s[0] * s[1]))
        report.median_short_side = int(statistics.median(min(s) for s in sizes))
    return report


def check_dataset(config: TrainingConfig, tokenizer=None) -> DatasetReport:
    """The report on every concept's pictures, captions, buckets and class folder, plus the
    config's own errors and warnings. Reads files only; never raises for a bad dataset."""
    report = DatasetReport()
    report.errors += [str(error) for error in config.validate()]
    report.warnings += config.warnings()
    from dreambooth.models.families import with_model_resolution

    config = with_model_resolution(config)
    if not config.resolution:  # no base model to ask: SD1.x's 512 px, said in the report
        config = config.with_resolution(UNRESOLVED_RESOLUTION)
        report.warnings.append("resolution 0 (the model's own): no base model to ask, checked "
                               "at 512 px")
    try:
        background_color(config.alpha_background)
    except DatasetError as exc:
        report.errors.append(str(exc))
        config = _with_white(config)
    native = not config.with_prior_preservation
    hashes: dict[str, list[str]] = {}
    for index, concept in enumerate(config.concepts):
        where = f"concepts[{index}]"
        uses_captions = FILEWORDS in concept.instance_prompt or native
        instance = check_folder(concept.instance_data_dir, f"{where}.instance_data_dir", config,
                                concept.instance_prompt, tokenizer=tokenizer,
                                recursive=config.recursive, captions_used=uses_captions,
                                hashes=hashes, masks_used=config.masked_training)
        item = ConceptReport(index, concept.instance_prompt, concept.class_prompt, instance)
        report.concepts.append(item)
        report.instance_pictures += instance.pictures
        _folder_findings(report, instance, config, is_class=False)
        _identifier_findings(report, item, config, tokenizer)
        if config.with_prior_preservation:
            item.class_wanted = config.class_images_for(concept)
            item.class_folder = check_folder(
                concept.class_data_dir, f"{where}.class_data_dir", config, concept.class_prompt,
                tokenizer=tokenizer, captions_used=FILEWORDS in concept.class_prompt,
                limit=item.class_wanted, hashes=hashes)
            item.class_missing = max(0, item.class_wanted - item.class_folder.pictures
                                     - len(item.class_folder.undecodable))
            _folder_findings(report, item.class_folder, config, is_class=True)
    for names in hashes.values():
        fields = {name.split(":")[0] for name in names}
        if len(fields) > 1 and any("class_data_dir" in f for f in fields) and any(
                "instance_data_dir" in f for f in fields):
            report.warnings.append("the same picture is in an instance folder and a class folder "
                                   f"({' = '.join(names)}); the class folder must hold only "
                                   "pictures the model generated")
    report.total_steps = config.total_steps(report.instance_pictures)
    if not config.max_train_steps and report.instance_pictures:
        report.warnings.append(f"max_train_steps is 0: {report.instance_pictures} pictures x 100 "
                               f"= {report.total_steps} steps (the rule of thumb)")
    return report


def _with_white(config: TrainingConfig) -> TrainingConfig:
    import dataclasses

    return dataclasses.replace(config, alpha_background="white")


def _folder_findings(report: DatasetReport, folder: FolderReport, config: TrainingConfig,
                     *, is_class: bool) -> None:
    """Turn one folder's facts into the report's errors and warnings."""
    name = folder.field
    if not folder.exists:
        if is_class:
            return  # created and filled by class picture generation
        report.errors.append(f"{name}: {folder.folder} is not a folder; give the folder with "
                             "this concept's pictures")
        return
    if not folder.pictures and not folder.undecodable and not is_class:
        report.errors.append(f"{name}: {folder.folder} holds no pictures (PNG, JPEG, WebP ...)")
    if folder.undecodable:
        text = (f"{name}: {len(folder.undecodable)} file(s) cannot be opened: "
                f"{_names(folder.undecodable)}")
        if config.skip_bad_images:
            report.warnings.append(text + " (they will be skipped)")
        else:
            report.errors.append(text + "; delete or re-save them, or turn on skip_bad_images")
    if not is_class and folder.pictures:
        if config.with_prior_preservation and folder.pictures < FEW_DREAMBOOTH_PICTURES:
            report.warnings.append(f"{name}: only {folder.pictures} pictures; DreamBooth learns a "
                                   "subject better from 10-40 varied ones")
        if not config.with_prior_preservation and folder.pictures < FEW_NATIVE_PICTURES:
            report.warnings.append(f"{name}: only {folder.pictures} pictures; native training "
                                   "wants roughly 100 to 10000 (more is better, still hand-picked)")
    if folder.below_resolution:
        report.warnings.append(f"{name}: {len(folder.below_resolution)} picture(s) smaller than "
                               f"the training size {config.resolution} px will be upscaled and "
                               f"look soft: {_names(folder.below_resolution)}")
    if folder.duplicates:
        report.warnings.append(f"{name}: identical pictures (they weigh double): "
                               + "; ".join(" = ".join(g) for g in folder.duplicates[:LIST_LIMIT]))
    if folder.transparent and not is_class:
        report.warnings.append(f"{name}: {len(folder.transparent)} transparent picture(s) are put "
                               f"on a {config.alpha_background} background; transparent "
                               "backgrounds can leave outlines around the subject")
    if folder.captions_used and folder.captions_missing:
        report.warnings.append(f"{name}: {len(folder.captions_missing)} picture(s) have no "
                               f"{config.caption_extension} caption (the file name or the prompt "
                               f"is used instead): {_names(folder.captions_missing)}")
    if folder.captions_not_utf8:
        report.warnings.append(f"{name}: caption file(s) not in UTF-8, read as Windows-1252; "
                               f"re-save them as UTF-8: {_names(folder.captions_not_utf8)}")
    if folder.captions_empty and folder.captions_used:
        report.warnings.append(f"{name}: empty caption file(s): {_names(folder.captions_empty)}")
    if folder.masks_used and folder.pictures:
        if not folder.masks_found:
            place = ("no picture has an alpha channel" if config.mask_source == "alpha"
                     else "no <name>.mask.png beside the pictures")
            report.warnings.append(f"{name}: masked training is on but {place}: every picture "
                                   "is trained whole")
        elif folder.masks_missing:
            report.warnings.append(f"{name}: {len(folder.masks_missing)} picture(s) have no mask "
                                   f"(trained whole): {_names(folder.masks_missing)}")
        if folder.masks_empty:
            report.warnings.append(_blank_mask_finding(name, folder, config))
            if config.mask_background_weight <= 0 and len(folder.masks_empty) == folder.pictures:
                report.errors.append(f"{name}: every mask is all black and mask_background_weight"
                                     " is 0, so this concept would train nothing; paint the "
                                     "subject white in the masks, or raise "
                                     "mask_background_weight above 0")
        if folder.masks_bad:
            problems = [b for b in folder.masks_bad if "stretched" not in b]
            text = f"{name}: mask(s) {_names(folder.masks_bad)}"
            (report.errors if problems else report.warnings).append(
                text + ("; re-save them as PNG" if problems else ""))
    if folder.prompts_too_long:
        report.warnings.append(f"{name}: prompts longer than 75 tokens are trained in chunks of "
                               "75 as the WebUI reads them; preview samples read only the first "
                               f"75: {_names(folder.prompts_too_long)}")
    if is_class:
        for path in list_pictures(folder.folder)[:LIST_LIMIT * 10]:
            if _has_camera_exif(path):
                folder.camera_pictures.append(path.name)
        if folder.camera_pictures:
            report.warnings.append(f"{name}: picture(s) with camera EXIF data: "
                                   f"{_names(folder.camera_pictures)}; the class folder must hold "
                                   "only pictures the model generated, not photos")


def _blank_mask_finding(name: str, folder: FolderReport, config: TrainingConfig) -> str:
    """All-black masks: the background weight is all that trains those pictures."""
    weight = config.mask_background_weight
    effect = ("with mask_background_weight 0 these pictures train nothing" if weight <= 0
              else f"only the background weight {weight} trains them")
    return f"{name}: all-black mask(s), {effect}: {_names(folder.masks_empty)}"


def _identifier_findings(report: DatasetReport, item: ConceptReport, config: TrainingConfig,
                         tokenizer) -> None:
    prompt = item.instance_prompt
    if "[V]" in prompt.upper():
        report.warnings.append(f"concepts[{item.index}].instance_prompt: {prompt!r} holds the "
                               "placeholder [V]; replace it with your rare identifier (e.g. "
                               "'photo of ohwx dog', 'by ohwx' for a style)")
    if not config.with_prior_preservation or tokenizer is None:
        return
    identifier = guess_identifier(prompt, item.class_prompt)
    if not identifier or "[" in identifier:
        return
    item.identifier = identifier_report(identifier, tokenizer)
    if item.identifier["verdict"] == "poor" and identifier.lower() != "sks":
        # sks is already in config.warnings()
        report.warnings.append(f"concepts[{item.index}].instance_prompt: "
                               f"{item.identifier['message']}")


def check_main(argv: list[str]) -> int:
    """``python -m dreambooth check CONFIG.json [--json] [--no-tokenizer]``: exit 0 when the
    pictures are ready, 2 when the config cannot be read or the report lists problems."""
    parser = argparse.ArgumentParser(prog="python -m dreambooth check",
                                     description="Report on the pictures of a training config.")
    parser.add_argument("config", help="training config JSON, or the seed's concepts_list file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="skip prompt-length and identifier checks (no CLIP vocabulary)")
    args = parser.parse_args(argv)
    from dreambooth.common.files import EXIT_BAD_INPUT, EXIT_OK

    try:
        config = TrainingConfig.load(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    tokenizer = None
    if not args.no_tokenizer:
        try:
            from dreambooth.models.tokenizer import load_clip_tokenizer

            tokenizer = load_clip_tokenizer()
        except Exception as exc:  # optional: the check still reports everything else
            print(f"(prompt lengths and identifiers not checked: {exc})", file=sys.stderr)
    report = check_dataset(config, tokenizer)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return EXIT_OK if report.ok else EXIT_BAD_INPUT
