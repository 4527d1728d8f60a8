"""Converters: the benchmarks' published annotation files → a manifest CSV (the manifest
contract: README, *Architecture* → *Data contracts*; the rules and the files per benchmark:
manifests/README.md).

``convert(benchmark, annotations_dir, videos_dir, split=None, out=None)`` reads the
annotation files of one benchmark, writes one manifest row per sample (validated with
:func:`pipeline.manifest.validate` before anything is written; temp file + rename) and
reports the videos it could not find under ``videos_dir`` (``<out>.missing.txt``). The
CLI's ``malmm-pipeline manifest BENCHMARK --annotations DIR --videos DIR`` calls it;
``malmm-pipeline extract --manifest OUT --video-root VIDEOS_DIR`` is the next step
(``video`` entries are relative to ``videos_dir`` unless ``absolute_paths=True``).

One module per annotation format family, each declaring per benchmark what files, what
rows and what columns (``annotations_dir`` may be the benchmark's folder, its
``annotation/`` folder, or a parent holding ``<dataset>/annotation/``):

================== ===================================================================
module             benchmarks and files
================== ===================================================================
``malmm_json``     MA-LMM reference JSON: ``lvu`` (``lvu/annotation/{train,val,test}.json``),
                   ``breakfast`` (``breakfast/annotation/…``), ``msrvtt-qa`` / ``msvd-qa`` /
                   ``activitynet-qa`` (``<dataset>/annotation/qa_{split}.json``),
                   ``msrvtt-cap`` / ``msvd-cap`` / ``youcook2-cap``
                   (``<dataset>/annotation/cap_{split}.json`` + ``coco_gt/cap_{split}.json``)
``coin``           ``coin``: the official ``COIN.json``
``epic_kitchens``  ``ek100``: the official ``EPIC_100_{train,validation}.csv``,
                   ``EPIC_100_{verb,noun}_classes.csv`` (+ video info, subset lists)
``core``           shared: ``ConversionError``, the typed readers, the video finder, the
                   conversion context, the atomic write
``registry``       ``CONVERTERS`` (benchmark → converter) and ``convert()``
================== ===================================================================

Video files are looked up under ``videos_dir`` by the reference's naming (``{id}.mp4`` …,
declared by each converter), any common video extension, and by a unique file name anywhere
in the tree (e.g. YouCook2's ``raw_videos/validation/113/{id}.mkv``); a video not found keeps
its documented path in the manifest and is listed in ``<out>.missing.txt``.
"""
from pipeline.converters.coin import COIN_EXCLUDED, COIN_SUBSETS
from pipeline.converters.core import (CORE_COLUMNS, SKIP_REFERENCE, SPLIT_ALIASES, VIDEO_EXTS, ConversionError,
                                      ConvertResult)
from pipeline.converters.epic_kitchens import (DEFAULT_ANTICIPATION_SEC, DEFAULT_OBSERVATION_SEC, EK100_COLUMNS,
                                               EK100_FILES, EK100_SUBSET_FILES, FIRST_FRAME_END_SEC)
from pipeline.converters.malmm_json import BREAKFAST_EXCLUDED
from pipeline.converters.registry import CONVERTERS, convert

__all__ = ["BREAKFAST_EXCLUDED", "COIN_EXCLUDED", "COIN_SUBSETS", "CONVERTERS", "CORE_COLUMNS",
           "DEFAULT_ANTICIPATION_SEC", "DEFAULT_OBSERVATION_SEC", "EK100_COLUMNS", "EK100_FILES",
           "EK100_SUBSET_FILES", "FIRST_FRAME_END_SEC", "SKIP_REFERENCE", "SPLIT_ALIASES", "VIDEO_EXTS",
           "ConversionError", "ConvertResult", "convert"]
