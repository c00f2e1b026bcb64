"""Rebuilds the bundled corpus (emo_jax/data/corpus/) from redistributable text on our machines.

    python -m emo_jax.data.build_corpus [--out emo_jax/data/corpus] [--domain_kb 1000]

Seven domains, each from files a fresh Debian 12 machine of ours has or can fetch by package
name (nothing else is downloaded): Python (the standard library), C (lz4 and Brotli sources
from their PyPI sdists, glibc headers), Perl (perl-modules), prose (The Devil's Dictionary and
the Jargon File, both public domain, `apt-get download`), legal (license texts and Debian
copyright files), structured data (JSON, XML, CSV and TSV tables) and man pages (troff).
Every document keeps `domain`, `source` (package, version and path) and `license`.

Files are cut at line (prose: paragraph) boundaries into documents of at most 4 KB, at most
`per_file` documents per file, so that no file dominates a domain. Whole files go to the eval
split (about 5% of each domain's bytes), so eval documents never share a file with training.
The output is deterministic for the same installed package versions: train.jsonl.gz,
eval.jsonl.gz, manifest.json, licenses/ and README.md (its tables are generated here).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

from absl import app, flags


MAX_CHARS, MIN_CHARS, EVAL_SHARE = 4096, 200, 0.05
SDISTS = {"lz4": "4.4.4", "brotli": "1.1.0"}
DEBS = ("dict-devil", "jargon-text")
LICENSE_FILES = {  # copied into corpus/licenses/: the texts our licenses ask to accompany copies
    "GPL-1.txt": "/usr/share/common-licenses/GPL-1",
    "GPL-2.txt": "/usr/share/common-licenses/GPL-2",
    "LGPL-2.1.txt": "/usr/share/common-licenses/LGPL-2.1",
    "Artistic-1.0-Perl.txt": "/usr/share/common-licenses/Artistic",
    "python3.11-stdlib-copyright.txt": "/usr/share/doc/libpython3.11-stdlib/copyright",
    "manpages-copyright.txt": "/usr/share/doc/manpages/copyright",
    "iso-codes-copyright.txt": "/usr/share/doc/iso-codes/copyright",
    "distro-info-data-copyright.txt": "/usr/share/doc/distro-info-data/copyright",
    "tzdata-copyright.txt": "/usr/share/doc/tzdata/copyright",
    "shared-mime-info-copyright.txt": "/usr/share/doc/shared-mime-info/copyright",
    "perl-copyright.txt": "/usr/share/doc/perl/copyright",
    "xkb-data-copyright.txt": "/usr/share/doc/xkb-data/copyright",
    "media-types-copyright.txt": "/usr/share/doc/media-types/copyright",
}


def _version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                         text=True, check=False)
    return out.stdout.strip() or "unknown"


def _owned(package: str, pattern: str) -> list[str]:
    """Files of an installed Debian package whose path matches `pattern`."""
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
    return sorted(p for p in out.stdout.split("\n") if re.search(pattern, p) and os.path.isfile(p)
                  and not os.path.islink(p))


def _debian_main_packages() -> set[str]:
    """Names of the packages in Debian's own archive (main), from apt's package lists."""
    targets = subprocess.run(["apt-get", "indextargets", "--format", "$(FILENAME)",
                              "Identifier: Packages"], capture_output=True, text=True, check=True)
    names = set()
    for path in targets.stdout.split():
        if "debian.org" in path and "_main_" in path:
            text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path],
                                  capture_output=True, text=True, check=True).stdout
            names.update(re.findall(r"^Package: (\S+)", text, flags=re.M))
    return names


def _read(path: str) -> str | None:
    opener = gzip.open if path.endswith((".gz", ".dz")) else open
    with opener(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# A candidate: (text loader, source label, license). Loaders are lazy: most are never read.
def _debian(package: str, pattern: str, license_: str, *, exclude: str = "^$"):
    version = _version(package)
    return [(lambda p=p: _read(p), f"debian:{package}={version}:{p}", license_)
            for p in _owned(package, pattern) if not re.search(exclude, p)]


def _fetch(workdir: str) -> dict:
    """Downloads the two sdists and two .debs by name; returns {name: local path}."""
    got = {}
    for name, version in SDISTS.items():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":all:", f"{name}=={version}", "-d", workdir], check=True)
        got[name] = next(p for p in glob.glob(os.path.join(workdir, "*.tar.gz"))
                         if os.path.basename(p).lower().startswith(name))
    subprocess.run(["apt-get", "download", *DEBS], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL)
    for deb in DEBS:
        path = next(p for p in glob.glob(os.path.join(workdir, f"{deb}_*.deb")))
        target = os.path.join(workdir, deb)
        subprocess.run(["dpkg-deb", "-x", path, target], check=True)
        got[deb] = (target, os.path.basename(path)[:-len("_all.deb")].replace("_", "="))
    return got


def _fetched_licenses(fetched: dict) -> dict[str, str]:
    """License texts of the downloaded sources, for corpus/licenses/."""
    texts = {}
    with tarfile.open(fetched["lz4"]) as tar:
        texts["lz4-python-bindings-LICENSE.txt"] = _member_text(tar, r"^lz4-[^/]+/LICENSE$")
        header = _member_text(tar, r"/lz4libs/lz4\.c$")
        texts["lz4-library-LICENSE.txt"] = header[:header.index("*/") + 2] + "\n"
    with tarfile.open(fetched["brotli"]) as tar:
        texts["brotli-LICENSE.txt"] = _member_text(tar, r"^Brotli-[^/]+/LICENSE$")
    for deb in DEBS:
        with open(os.path.join(fetched[deb][0], "usr/share/doc", deb, "copyright")) as f:
            texts[f"{deb}-copyright.txt"] = f.read()
    return texts


def _member_text(tar: tarfile.TarFile, pattern: str) -> str:
    member = next(m for m in tar.getmembers() if re.search(pattern, m.name))
    return tar.extractfile(member).read().decode("utf-8")


def _sdist_files(tar_path: str, name: str, rules: list[tuple[str, str]]):
    """C files of an sdist: [(loader, source, license)] for members matching a rule's regex."""
    out = []
    with tarfile.open(tar_path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            license_ = next((lic for pattern, lic in rules if re.search(pattern, member.name)),
                            None)
            if member.isfile() and license_:
                text = tar.extractfile(member).read().decode("utf-8", "replace")
                out.append((lambda t=text: t, f"pypi:{name}=={SDISTS[name]}:{member.name}",
                            license_))
    return out


def _prose(root: str, label: str, relpath: str, start: str):
    text = _read(os.path.join(root, relpath))
    text = text[text.index(start):] if start in text else text
    return [(lambda t=text: t, f"debian:{label}:/{relpath}", "public-domain")]


def candidates(fetched: dict) -> dict[str, tuple[list, int]]:
    """domain -> (candidate files, most documents taken from one file)."""
    c_rules_lz4 = [(r"lz4libs/.*\.[ch]$", "BSD-2-Clause"), (r"/lz4/.*\.[ch]$", "BSD-3-Clause")]
    devil_root, devil_label = fetched["dict-devil"]
    jargon_root, jargon_label = fetched["jargon-text"]
    debian_main = _debian_main_packages()
    return {
        "python": (_debian("libpython3.11-stdlib", r"^/usr/lib/python3\.11/.*\.py$", "PSF-2.0",
                           exclude=r"/(test|tests|idle_test|lib2to3/tests)/"), 4),
        "c": (_sdist_files(fetched["lz4"], "lz4", c_rules_lz4)
              + _sdist_files(fetched["brotli"], "brotli", [(r"/c/.*\.[ch]$", "MIT")])
              + _debian("libc6-dev", r"^/usr/include/[^/]+\.h$", "LGPL-2.1-or-later"), 6),
        "perl": (_debian("perl-modules-5.36", r"\.pm$", "Artistic-1.0-Perl OR GPL-1.0-or-later"),
                 4),
        "prose": (_prose(devil_root, devil_label, "usr/share/dictd/devil.dict.dz", "ABASEMENT")
                  + _prose(jargon_root, jargon_label, "usr/share/doc/jargon-text/jargon.txt.gz",
                           "Glossary"), 200),
        "legal": (_debian("base-files", r"^/usr/share/common-licenses/", "license text "
                          "(verbatim copies permitted)")
                  + [(lambda p=p: _read(p), f"debian:{p.split('/')[4]}:{p}",
                      "Debian copyright file (licensing stated in its text)")
                     for p in sorted(glob.glob("/usr/share/doc/*/copyright"))
                     if not os.path.islink(p) and p.split("/")[4] in debian_main], 3),
        "data": (_debian("iso-codes", r"/json/.*\.json$", "LGPL-2.1-or-later")
                 + _debian("distro-info-data", r"\.csv$", "ISC")
                 + _debian("tzdata", r"^/usr/share/zoneinfo/[^/]+\.tab$", "public-domain")
                 + _debian("shared-mime-info", r"freedesktop\.org\.xml$", "GPL-2.0-or-later")
                 + _debian("xkb-data", r"/rules/[^/]+\.(xml|lst)$",
                           "MIT-style (see licenses/xkb-data-copyright.txt)")
                 + _debian("media-types", r"^/etc/mime\.types$", "public-domain"), 40),
        "man": (_debian("manpages", r"/man/man\d/.*\.gz$", "see licenses/manpages-copyright.txt")
                + _debian("manpages-dev", r"/man/man\d/.*\.gz$",
                          "see licenses/manpages-copyright.txt"), 3),
    }


def split_pieces(text: str, rng: random.Random, *, paragraphs: bool) -> list[str]:
    """Cuts text at line (or paragraph) boundaries into pieces of varied length <= MAX_CHARS."""
    blocks = re.split(r"(?<=\n\n)", text) if paragraphs else text.splitlines(keepends=True)
    pieces, current, target = [], "", rng.randint(MAX_CHARS // 4, MAX_CHARS)
    for block in blocks:
        while len(block) > MAX_CHARS:  # one huge line (minified data): cut it hard
            pieces.append(current + block[:MAX_CHARS - len(current)])
            block, current = block[MAX_CHARS - len(current):], ""
        if current and len(current) + len(block) > target:
            pieces.append(current)
            current, target = "", rng.randint(MAX_CHARS // 4, MAX_CHARS)
        current += block
    pieces.append(current)
    return [p.strip("\n") + "\n" for p in pieces if len(p.strip()) >= MIN_CHARS]


def _license_of(text: str, default: str) -> str:
    found = re.search(r"SPDX-License-Identifier:\s*([^\n]+)", text[:2000])
    return found.group(1).strip() if found and default.startswith("see ") else default


def build_domain(domain: str, files: list, per_file: int, budget: int, rng: random.Random,
                 seen: set):
    """(train docs, eval docs) of one domain: shuffled files, eval ~EVAL_SHARE of bytes.
    Pieces already in `seen` (identical files of several packages) are left out."""
    order = list(range(len(files)))
    rng.shuffle(order)
    train, evals, train_bytes, eval_bytes = [], [], 0, 0
    for i in order:
        if train_bytes >= budget:
            break
        load, source, license_ = files[i]
        text = load()
        if text is None or sum(ch.isdigit() for ch in text) > 0.3 * len(text):
            continue  # not UTF-8, or numeric tables (e.g. Brotli's static dictionary)
        pieces = split_pieces(text, rng, paragraphs=domain == "prose")
        if len(pieces) > per_file:
            pieces = [pieces[j] for j in sorted(rng.sample(range(len(pieces)), per_file))]
        pieces = [p for p in pieces if p not in seen]
        seen.update(pieces)
        license_ = _license_of(text, license_)
        docs = [{"text": p, "domain": domain, "source": source, "license": license_}
                for p in pieces]
        size = sum(len(p) for p in pieces)
        to_eval = eval_bytes < EVAL_SHARE * (train_bytes + eval_bytes + size)
        if domain == "prose":  # two long files: hold out every 20th document instead
            evals += docs[::20]
            docs = [d for j, d in enumerate(docs) if j % 20]
            to_eval = False
        (evals if to_eval else train).extend(docs)
        eval_bytes += size if to_eval else 0
        train_bytes += 0 if to_eval else sum(len(d["text"]) for d in docs)
    return train, evals


def _write_jsonl_gz(path: str, docs: list[dict]):
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for doc in docs:
            f.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))


def _define_flags():
    """CLI flags, defined only when run as a program."""
    flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "corpus"),
                        "Folder to write the corpus into.")
    flags.DEFINE_integer("domain_kb", 1000, "Training text per domain, in KB.")
    flags.DEFINE_integer("seed", 0, "Selection seed.")


def main(argv):
    del argv
    seed, domain_kb = flags.FLAGS.seed, flags.FLAGS.domain_kb
    out, rng = flags.FLAGS.out, random.Random(seed)
    with tempfile.TemporaryDirectory() as workdir:
        fetched = _fetch(workdir)
        fetched_licenses = _fetched_licenses(fetched)
        all_train, all_eval, seen = [], [], set()
        manifest = {"domains": {}, "seed": seed}
        for domain, (files, per_file) in candidates(fetched).items():
            train, evals = build_domain(domain, files, per_file, domain_kb * 1000,
                                        random.Random(f"{seed}:{domain}"), seen)
            all_train += train
            all_eval += evals
            manifest["domains"][domain] = {
                "train_docs": len(train), "eval_docs": len(evals),
                "train_chars": sum(len(d["text"]) for d in train),
                "eval_chars": sum(len(d["text"]) for d in evals),
                "files": len({d["source"] for d in train + evals}),
                "licenses": sorted({d["license"] for d in train + evals}),
                "sources": sorted({d["source"].split(":")[0] + ":" + d["source"].split(":")[1]
                                   for d in train + evals}),
            }
            print(domain, manifest["domains"][domain]["train_docs"],
                  manifest["domains"][domain]["eval_docs"], flush=True)
    rng.shuffle(all_train)
    os.makedirs(os.path.join(out, "licenses"), exist_ok=True)
    _write_jsonl_gz(os.path.join(out, "train.jsonl.gz"), all_train)
    _write_jsonl_gz(os.path.join(out, "eval.jsonl.gz"), all_eval)
    for name, path in LICENSE_FILES.items():
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out, "licenses", name))
    for name, text in fetched_licenses.items():
        with open(os.path.join(out, "licenses", name), "w") as f:
            f.write(text)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    _write_readme(out, manifest)


def _short(sources: list[str]) -> str:
    more = f", and {len(sources) - 3} more Debian packages" if len(sources) > 4 else ""
    return ", ".join(sources[:3] if more else sources) + more


def _write_readme(out: str, manifest: dict):
    rows = "\n".join(
        f"| {name} | {m['train_docs']} | {m['eval_docs']} | {m['train_chars'] / 1e6:.2f} | "
        f"{m['files']} | {_short(m['sources'])} | {'; '.join(m['licenses'])} |"
        for name, m in manifest["domains"].items())
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README.replace("{{TABLE}}", rows))


README = """\
# The bundled corpus

A small multi-domain corpus of real text, shipped inside the package so that the tiny config
trains end to end on a fresh machine with no download. It is the default data of emo_jax:
`data.train_sources = ''` reads `train.jsonl.gz`, `data.eval_sources = ''` reads
`eval.jsonl.gz` (spec names `bundled:train`, `bundled:eval`).

Each line of the two gzipped JSONL files is one document:
`{"text": ..., "domain": ..., "source": ..., "license": ...}`. `source` names the Debian
package or PyPI sdist, its version and the file the text was cut from; `license` is the
license of that file (an SPDX identifier where one applies). Documents are pieces of at most
4 KB cut at line boundaries (paragraphs for prose), at most a few per file, so lengths vary
from 200 bytes to 4 KB. Eval documents come from files that no training document comes from
(prose: every 20th piece of the two books). `manifest.json` holds the counts below.

| domain | train docs | eval docs | train MB | files | from | licenses |
|---|---|---|---|---|---|---|
{{TABLE}}

## Domains and provenance

- **python**: the Python 3.11 standard library (`/usr/lib/python3.11`, Debian package
  libpython3.11-stdlib), test suites excluded. PSF-2.0 (licenses/python3.11-stdlib-copyright.txt).
- **c**: the C sources of lz4 4.4.4 and Brotli 1.1.0 from their PyPI sdists (lz4 library
  BSD-2-Clause, lz4 bindings BSD-3-Clause, Brotli MIT; each file keeps its license header)
  and the glibc headers of libc6-dev (`/usr/include/*.h`, LGPL-2.1-or-later). Files that are
  mostly numeric tables are left out. The lz4 and Brotli license texts are in licenses/.
- **perl**: Perl 5.36 core modules (perl-modules-5.36, `*.pm`), Artistic-1.0-Perl OR
  GPL-1.0-or-later.
- **prose**: *The Devil's Dictionary* by Ambrose Bierce (Debian dict-devil) and the Jargon
  File 4.4.7 (Debian jargon-text), both in the public domain (see their Debian copyright
  files, quoted in licenses/). Historical texts: some entries are dated or offensive.
- **legal**: license texts from `/usr/share/common-licenses` (base-files; verbatim copies
  permitted) and the `copyright` files of the installed packages that come from Debian's
  main archive (DFSG-free; packages from other apt repositories are left out). The full
  package list is in manifest.json.
- **data**: structured data: ISO code tables as JSON (iso-codes, LGPL-2.1-or-later),
  the freedesktop.org MIME database as XML (shared-mime-info, GPL-2.0-or-later), keyboard
  layout rules as XML and lists (xkb-data, MIT-style), Debian and Ubuntu release tables as
  CSV (distro-info-data, ISC), time-zone tables as TSV (tzdata, public domain) and
  /etc/mime.types (media-types, public domain).
- **man**: Linux man pages in troff source (manpages, manpages-dev); each page's license is
  in its header comment (usually an SPDX line, copied into `license`), and all are listed in
  licenses/manpages-copyright.txt.

All of it is redistributable under the licenses named; the texts that those licenses ask to
accompany copies are in `licenses/`: GPL-1, GPL-2, LGPL-2.1, Artistic, the lz4 and Brotli
licenses, and the Debian copyright files of the packages used. Documents are pieces of files,
so a file's own license header is in its first piece only; the `license` field is on all.

## Rebuild

    python -m emo_jax.data.build_corpus --out emo_jax/data/corpus

on Debian 12 (our machine image) with the packages above installed (they are on the image),
and the package registries reachable: the script runs `pip download lz4==4.4.4 brotli==1.1.0`
(sdists) and `apt-get download dict-devil jargon-text`. Selection is seeded (`--seed`), so the
output is identical for the same package versions; `--domain_kb` sets the training text per
domain (default 1000 KB).
"""


if __name__ == "__main__":
    _define_flags()
    app.run(main)
