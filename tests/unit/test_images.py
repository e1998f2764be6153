"""The default guest image builder: cpio writer, module ordering, command encoding, init script, cache.

The real build (downloads ~28 MB of Debian packages, optionally boots under QEMU TCG)
lives in tests/linux/test_image_build.py.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import lzma
import platform
import re
import shlex
import shutil
import stat
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm import images
from pyvmm.images import build as image_build, image as image_files
from pyvmm.images import recipe as image_recipe, symbols as image_symbols
from pyvmm.images import (
    CMD_PARAM,
    MAX_CMD_PARAM,
    GuestImage,
    ImageError,
    build_default_image,
    decode_command,
    default_image,
    encode_command,
    init_script,
    cached_image,
)
from pyvmm.images.cli import register_cli, run_image_command
from pyvmm.images.initramfs import (
    OUTB_HELPER_CODE,
    OUTB_HELPER_SOURCE,
    CpioEntry,
    Initramfs,
    gzip_deterministic,
    outb_helper_elf,
    write_newc,
)
from pyvmm.images.modules import (
    DEFAULT_MODULES,
    ModuleError,
    ModuleIndex,
    format_load_list,
    format_modules_dep,
    load_order,
    module_name,
    parse_modules_dep,
    read_modinfo,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pyvmm" / "images"


from helpers.newc import read_newc  # noqa: E402  (an independent reader, shared with tests/linux)


def sample_tree() -> Initramfs:
    fs = Initramfs()
    fs.mkdir("tmp", 0o1777)
    fs.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    fs.file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    fs.symlink("bin/sh", "/bin/busybox")
    fs.symlink("usr/bin/[", "/bin/busybox")
    fs.chardev("dev/console", 5, 1)
    fs.file("etc/empty", b"")
    fs.file("lib/modules/6.1.0-x/kernel/a.ko", b"abc")  # odd size: data padding
    return fs


class TestCpio:
    def test_round_trip_headers_and_types(self):
        entries = {e["name"]: e for e in read_newc(sample_tree().cpio())}
        assert set(entries) == {"tmp", "init", "bin", "bin/busybox", "bin/sh", "usr", "usr/bin", "usr/bin/[",
                                "dev", "dev/console", "etc", "etc/empty", "lib", "lib/modules",
                                "lib/modules/6.1.0-x", "lib/modules/6.1.0-x/kernel",
                                "lib/modules/6.1.0-x/kernel/a.ko"}
        init = entries["init"]
        assert stat.S_ISREG(init["mode"]) and stat.S_IMODE(init["mode"]) == 0o755
        assert init["data"] == b"#!/bin/sh\necho hi\n" and init["filesize"] == len(init["data"])
        assert (init["uid"], init["gid"], init["mtime"], init["nlink"]) == (0, 0, 0, 1)
        link = entries["bin/sh"]
        assert stat.S_ISLNK(link["mode"]) and link["data"] == b"/bin/busybox"
        console = entries["dev/console"]
        assert stat.S_ISCHR(console["mode"]) and (console["rdevmajor"], console["rdevminor"]) == (5, 1)
        assert console["filesize"] == 0
        tmp = entries["tmp"]
        assert stat.S_ISDIR(tmp["mode"]) and stat.S_IMODE(tmp["mode"]) == 0o1777 and tmp["nlink"] == 2
        assert entries["lib/modules/6.1.0-x/kernel/a.ko"]["data"] == b"abc"
        assert entries["etc/empty"]["filesize"] == 0

    def test_sorted_parents_first_unique_inodes(self):
        entries = read_newc(sample_tree().cpio())
        names = [e["name"] for e in entries]
        assert names == sorted(names, key=lambda n: n.split("/"))
        seen = set()
        for name in names:
            parent = name.rpartition("/")[0]
            assert not parent or parent in seen, f"{name} before its directory"
            seen.add(name)
        inodes = [e["ino"] for e in entries]
        assert inodes == list(range(1, len(entries) + 1))

    def test_trailer(self):
        data = write_newc([])
        assert read_newc(data) == []
        assert b"TRAILER!!!\0" in data and len(data) % 4 == 0

    def test_deterministic_whatever_the_insertion_order(self):
        entries = list(sample_tree().entries.values())
        assert write_newc(entries) == write_newc(list(reversed(entries)))
        assert sample_tree().cpio_gz() == sample_tree().cpio_gz()
        assert gzip.decompress(sample_tree().cpio_gz()) == sample_tree().cpio()
        assert sample_tree().cpio_gz()[4:8] == b"\0\0\0\0"  # gzip MTIME field
        assert gzip_deterministic(b"x" * 100) == gzip_deterministic(b"x" * 100)

    def test_rejects_bad_input(self):
        with pytest.raises(ValueError):
            write_newc([CpioEntry("a", stat.S_IFREG | 0o644), CpioEntry("a", stat.S_IFREG | 0o644)])
        for bad in ("/abs", "", "a/../b", "a//b", "nul\0"):
            with pytest.raises(ValueError):
                CpioEntry(bad, stat.S_IFREG | 0o644)
        with pytest.raises(ValueError):
            CpioEntry("x", 0o644)  # no file type
        with pytest.raises(ValueError):
            CpioEntry("d", stat.S_IFDIR | 0o755, data=b"x")
        fs = Initramfs()
        fs.file("a", b"")
        with pytest.raises(ValueError):
            fs.file("a/b", b"")  # a is not a directory
        with pytest.raises(ValueError):
            fs.symlink("a", "/x")

    @settings(max_examples=60, deadline=None)
    @given(st.dictionaries(
        st.lists(st.text(alphabet="abcXYZ019._-[", min_size=1, max_size=6).filter(lambda s: s not in (".", "..")),
                 min_size=1, max_size=3).map("/".join),
        st.binary(max_size=40), max_size=12))
    def test_round_trip_any_tree(self, files):
        fs = Initramfs()
        added = {}
        for path, content in files.items():
            try:
                fs.file(path, content)
            except ValueError:
                continue  # a path already used as a directory, or below a file
            added[path] = content
        parsed = {e["name"]: e for e in read_newc(fs.cpio())}
        for path, content in added.items():
            assert parsed[path]["data"] == content

    @pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
    def test_gnu_cpio_lists_it(self, tmp_path):
        archive = tmp_path / "a.cpio"
        archive.write_bytes(sample_tree().cpio())
        out = subprocess.run(["cpio", "-it", "--quiet"], stdin=archive.open("rb"), capture_output=True, text=True,
                             check=True).stdout.split()
        assert "bin/busybox" in out and "dev/console" in out and "usr/bin/[" in out


# --- modules -------------------------------------------------------------------------------

SYNTHETIC_DEP = """\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def assert_deps_first(order, graph):
    position = {name: i for i, name in enumerate(order)}
    assert len(position) == len(order), "a module appears twice"
    for name in order:
        for dep in graph.get(name, ()):
            assert position[dep] < position[name], f"{dep} must load before {name}"


class TestModuleOrder:
    def test_parse_and_order(self):
        graph = parse_modules_dep(SYNTHETIC_DEP)
        assert graph["virtio_rng"] == ("virtio", "virtio_ring")
        order = load_order(["virtio_net", "virtio-rng", "virtio_pci"], graph)
        assert_deps_first(order, graph)
        assert set(order) == set(graph)
        # only what is needed: virtio_pci pulls its two library modules, nothing else
        assert load_order(["virtio_pci"], graph)[-1] == "virtio_pci"
        assert set(load_order(["virtio_pci"], graph)) == {"virtio_pci", "virtio_pci_modern_dev",
                                                          "virtio_pci_legacy_dev", "virtio", "virtio_ring"}

    def test_default_list_order_is_kept(self):
        graph = parse_modules_dep(SYNTHETIC_DEP)
        wanted = [module_name(m) for m in DEFAULT_MODULES]
        order = load_order(wanted, graph)
        assert order == wanted  # the documented order already satisfies the dependencies

    def test_cycle(self):
        with pytest.raises(ModuleError, match="cycle: a -> b -> a"):
            load_order(["a"], {"a": ("b",), "b": ("a",)})

    def test_bad_modules_dep(self):
        with pytest.raises(ModuleError):
            parse_modules_dep("kernel/a.ko kernel/b.ko\n")

    def test_names(self):
        assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
        assert module_name("virtio_net.ko.xz") == "virtio_net"
        assert module_name("vsock") == "vsock"

    @settings(max_examples=100, deadline=None)
    @given(st.data())
    def test_random_dags(self, data):
        n = data.draw(st.integers(1, 12))
        names = [f"m{i}" for i in range(n)]
        # edges only to lower-numbered modules: acyclic by construction
        graph = {name: tuple(data.draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else ())
                 for i, name in enumerate(names)}
        wanted = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
        order = load_order(wanted, graph)
        assert_deps_first(order, graph)
        assert set(wanted) <= set(order)


def fake_module(name: str, depends: str, aliases: tuple[str, ...] = ()) -> bytes:
    """A minimal ELF64 relocatable with a .modinfo section, as a kernel module has."""
    modinfo = "".join(f"alias={alias}\0" for alias in aliases).encode()
    modinfo += f"license=GPL\0depends={depends}\0name={name}\0vermagic=6.1.0 SMP mod_unload\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body = modinfo + shstrtab
    shoff = 64 + len(body)
    shoff += -shoff % 8
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0,
                       64, 3, 2)
    null = bytes(64)
    sec_modinfo = struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, 64, len(modinfo), 0, 0, 1, 0)
    sec_shstr = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, 64 + len(modinfo), len(shstrtab), 0, 0, 1, 0)
    blob = ehdr + body
    blob += bytes(shoff - len(blob))
    return blob + null + sec_modinfo + sec_shstr


class TestModuleIndex:
    @pytest.fixture
    def tree(self, tmp_path):
        root = tmp_path / "lib" / "modules" / "6.1.0-test"
        files = {
            "kernel/drivers/virtio/virtio_ring.ko": ("virtio_ring", ""),
            "kernel/drivers/virtio/virtio.ko": ("virtio", "virtio_ring"),
            "kernel/drivers/char/hw_random/virtio-rng.ko.xz": ("virtio_rng", "virtio,virtio_ring,rng_core",
                                                               ("virtio:d00000004v*",)),
            "kernel/net/vmw_vsock/vsock.ko.gz": ("vsock", ""),
        }
        for rel, (name, deps, *aliases) in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            elf = fake_module(name, deps, *aliases)
            if rel.endswith(".xz"):
                elf = lzma.compress(elf)
            elif rel.endswith(".gz"):
                elf = gzip.compress(elf)
            path.write_bytes(elf)
        (root / "modules.builtin").write_text("kernel/drivers/char/hw_random/rng-core.ko\n")
        return root

    def test_read_modinfo(self):
        info = read_modinfo(fake_module("virtio_net", "virtio,net_failover"))
        assert info["depends"] == ["virtio,net_failover"] and info["name"] == ["virtio_net"]
        with pytest.raises(ModuleError):
            read_modinfo(b"not an elf at all" * 8)

    def test_resolve_decompress_builtin_missing(self, tree):
        index = ModuleIndex(tree)
        modules, missing = index.resolve(["virtio-rng", "vsock", "no_such_module"])
        assert [m.name for m in modules] == ["virtio_ring", "virtio", "virtio_rng", "vsock"]
        assert missing == ["no_such_module"]  # rng_core is built in: neither loaded nor missing
        rng = modules[2]
        assert rng.plain_relpath == "kernel/drivers/char/hw_random/virtio-rng.ko"
        assert index.elf(rng.relpath)[:4] == b"\x7fELF"  # .xz decompressed for busybox insmod
        assert index.elf(modules[3].relpath)[:4] == b"\x7fELF"  # .gz too
        dep = parse_modules_dep(format_modules_dep(modules))
        assert dep["virtio_rng"] == ("virtio", "virtio_ring")  # depmod's order: modprobe loads it backwards
        assert_deps_first([m.name for m in modules], dep)
        text = format_modules_dep(modules)
        assert "virtio-rng.ko:" in text and ".xz" not in text

    def test_load_list_says_what_each_module_needs_and_drives(self, tree):
        modules, missing = ModuleIndex(tree).resolve(["virtio-rng", "vsock", "no_such_module"])
        lines = [line.split(" ") for line in format_load_list(modules, missing).splitlines()]
        assert [fields[0] for fields in lines] == ["virtio_ring", "virtio", "virtio_rng", "vsock", "no_such_module"]
        name, path, needs, *aliases = lines[2]
        assert path == "kernel/drivers/char/hw_random/virtio-rng.ko" and needs == "virtio_ring,virtio"
        # /init matches the patterns (POSIX EREs) against /sys/bus/*/devices/*/modalias
        assert aliases == ["^virtio:d00000004v.*$"]
        assert re.match(aliases[0], "virtio:d00000004v00001AF4")
        assert not re.match(aliases[0], "virtio:d00000002v00001AF4")
        assert lines[0][2:] == ["-"]  # a library module: needs nothing, drives nothing
        assert lines[-1] == ["no_such_module", "-"]


# --- the command on the kernel command line ------------------------------------------------

argv_strategy = st.lists(
    st.text(alphabet=st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=30),
    min_size=1, max_size=6)


class TestEncodeCommand:
    @settings(max_examples=300, deadline=None)
    @given(argv_strategy)
    def test_round_trip(self, argv):
        param = encode_command(argv)
        assert param.startswith(CMD_PARAM)
        value = param[len(CMD_PARAM):]
        assert re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", value), "only base64 characters"
        assert not re.search(r"[\s'\"\\]", param), "the kernel command line parser would split or unquote it"
        assert len(param) <= MAX_CMD_PARAM
        script = base64.b64decode(value).decode("utf-8")
        assert shlex.split(script) == argv
        assert decode_command(param) == script == decode_command(value)

    @pytest.mark.skipif(shutil.which("dash") is None and shutil.which("busybox") is None, reason="no dash/busybox")
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.text(alphabet=st.characters(exclude_characters="\0", exclude_categories=("Cs",)),
                            max_size=20), min_size=0, max_size=4))
    def test_a_posix_shell_sees_the_same_argv(self, args):
        """What init does: sh -c "$(base64 -d)"; printf shows the arguments the command got."""
        shell = shutil.which("dash") or shutil.which("busybox")
        argv = ["printf", "%s\\0"] + args
        script = decode_command(encode_command(argv))
        prefix = [shell] if not shell.endswith("busybox") else [shell, "sh"]
        out = subprocess.run(prefix + ["-c", script], capture_output=True, check=True).stdout
        expected = b"".join(a.encode() + b"\0" for a in args) if args else b"\0"
        assert out == expected

    def test_rejects(self):
        with pytest.raises(ValueError):
            encode_command([])
        with pytest.raises(ValueError):
            encode_command(["echo", "a\0b"])
        with pytest.raises(ValueError):
            encode_command(["echo", "\udc80"])  # a lone surrogate is no UTF-8
        with pytest.raises(TypeError):
            encode_command("uname -a")  # type: ignore[arg-type]
        with pytest.raises(ImageError, match="too long"):
            encode_command(["echo", "x" * 2000])

    def test_command_line(self, tmp_path):
        image = GuestImage("default", tmp_path, tmp_path / "vmlinuz", tmp_path / "i.gz", "6.1", {})
        line = image.command_line(["sh", "-c", "exit 3"], extra="noxsave")
        assert line.startswith(images.DEFAULT_CMDLINE + " noxsave pyvmm.cmd=")
        assert decode_command(line.split()[-1]) == "sh -c 'exit 3'"
        assert image.command_line() == images.DEFAULT_CMDLINE


# --- init.sh and the port helper -----------------------------------------------------------

SHELLS = [s for s in ("dash", "busybox") if shutil.which(s)]


class TestInit:
    @pytest.mark.skipif(not SHELLS, reason="neither dash nor busybox installed for `sh -n`")
    @pytest.mark.parametrize("shell", SHELLS)
    def test_syntax(self, shell, tmp_path):
        script = tmp_path / "init"
        script.write_bytes(init_script())
        cmd = [shell, "-n", str(script)] if shell == "dash" else [shell, "sh", "-n", str(script)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

    def test_ports_match_the_platform_layout(self):
        from pyvmm.arch.x86_64.layout import GUEST_NOTIFY_PORT, GUEST_STATUS_PORT

        text = init_script().decode()
        assert text.startswith("#!/bin/sh\n")
        assert re.search(rf"pyvmm_outb {GUEST_NOTIFY_PORT} 1\b", text)
        assert re.search(rf'pyvmm_outb {GUEST_STATUS_PORT} "\$status"', text)
        assert "pyvmm: exit status $status" in text and "pyvmm.cmd=" in text and "poweroff -f" in text
        assert "reboot -f" in text  # without ACPI

    def test_outb_helper_elf(self):
        elf = outb_helper_elf()
        assert elf[:4] == b"\x7fELF" and elf[4] == 2 and struct.unpack_from("<H", elf, 18)[0] == 62
        entry, phoff = struct.unpack_from("<QQ", elf, 24)
        p_type, p_flags, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff)
        assert (p_type, p_flags, p_offset, p_filesz) == (1, 5, 0, len(elf))
        assert elf[entry - p_vaddr:] == OUTB_HELPER_CODE

    @pytest.mark.skipif(not (shutil.which("as") and shutil.which("objcopy")), reason="GNU binutils not installed")
    def test_outb_helper_bytes_match_the_source(self, tmp_path):
        obj, binary = tmp_path / "outb.o", tmp_path / "outb.bin"
        subprocess.run(["as", "--64", "-o", str(obj), "-"], input=OUTB_HELPER_SOURCE.encode(), check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)], check=True)
        assert binary.read_bytes() == OUTB_HELPER_CODE

    @pytest.mark.skipif(platform.machine() != "x86_64" or platform.system() != "Linux", reason="x86-64 Linux only")
    @pytest.mark.parametrize("args", [[], ["1552"], ["x", "1"], ["70000", "1"], ["1552", "256"], ["", "1"]])
    def test_outb_helper_rejects_bad_arguments(self, args, tmp_path):
        exe = tmp_path / "pyvmm-outb"
        exe.write_bytes(outb_helper_elf())
        exe.chmod(0o755)
        assert subprocess.run([str(exe), *args]).returncode == 1


# --- the cache, with a fake build ----------------------------------------------------------

@pytest.fixture
def fake_build(monkeypatch):
    calls = []

    def _build(work, progress):
        calls.append(work)
        out = work / "out"
        out.mkdir()
        (out / "vmlinuz").write_bytes(b"MZ fake bzImage")
        (out / "initramfs.cpio.gz").write_bytes(sample_tree().cpio_gz())
        artifacts = {name: {"sha256": image_files.sha256_file(out / name), "size": (out / name).stat().st_size}
                     for name in ("vmlinuz", "initramfs.cpio.gz")}
        manifest = {"format": images.FORMAT_VERSION, "name": "default", "recipe": image_recipe.recipe_hash(),
                    "kernel_version": "6.1.0-test", "packages": {"busybox-static": "1"}, "modules": ["virtio"],
                    "cmdline": images.DEFAULT_CMDLINE, "artifacts": artifacts, "built_at": "x", "build_seconds": 0}
        manifest["symbols"] = image_symbols.symbols_record(out, artifacts["vmlinuz"]["sha256"], progress)
        (out / "manifest.json").write_text(json.dumps(manifest))
        progress("fake build")
        return manifest

    monkeypatch.setattr(image_build, "_build", _build)
    return calls


FAKE_MAP = "ffffffff81000000 T _text\nffffffff81000000 T startup_64\n"


@pytest.fixture(autouse=True)
def fake_kernel_symbols(monkeypatch):
    """The fake kernels have no kallsyms: the symbols come from here (None: a kernel without)."""
    state = {"text": FAKE_MAP, "calls": 0}

    def _kernel_symbols(vmlinuz):
        state["calls"] += 1
        if state["text"] is None:
            raise ImageError("no kallsyms tables found")
        return state["text"]

    monkeypatch.setattr(image_symbols, "_kernel_symbols", _kernel_symbols)
    return state


class TestCache:
    def test_missing_without_build(self, private_cache):
        with pytest.raises(ImageError, match="pyvmm image build"):
            default_image(build_if_missing=False)

    def test_build_reuse_rebuild_and_repair(self, fake_build, private_cache):
        messages = []
        image = default_image(progress=messages.append)
        assert image.kernel == private_cache / "default" / "vmlinuz"
        assert image.initramfs.read_bytes() == sample_tree().cpio_gz()
        assert image.kernel_version == "6.1.0-test" and image.modules == ("virtio",)
        assert len(fake_build) == 1 and messages[-1] == "fake build" and "kernel symbols" in messages[0]
        assert default_image(progress=messages.append) == image
        assert build_default_image(progress=messages.append) == image
        assert len(fake_build) == 1, "a complete image is not rebuilt"
        build_default_image(rebuild=True, progress=None)
        assert len(fake_build) == 2
        # a damaged artifact is noticed and the image rebuilt
        (private_cache / "default" / "vmlinuz").write_bytes(b"MZ fake bzImagf")
        with pytest.raises(ImageError, match="sha256"):
            cached_image()
        default_image(progress=messages.append)
        assert len(fake_build) == 3 and any("rebuilding" in m for m in messages)
        # nothing left behind but the image and the lock
        assert sorted(p.name for p in private_cache.iterdir()) == [".default.lock", "default"]
        assert sorted(p.name for p in (private_cache / "default").iterdir()) == [
            "System.map", "initramfs.cpio.gz", "manifest.json", "vmlinuz"]
        assert image.system_map == private_cache / "default" / "System.map"

    def test_stale_recipe_is_rebuilt(self, fake_build, private_cache):
        default_image(progress=None)
        manifest_path = private_cache / "default" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["recipe"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(ImageError, match="recipe"):
            cached_image()
        default_image(progress=None)
        assert len(fake_build) == 2

    def test_an_image_without_symbols_gets_them_without_a_rebuild(self, fake_build, private_cache,
                                                                   fake_kernel_symbols):
        """Images built before pyvmm kept a System.map stay valid: the map is added on first use."""
        default_image(progress=None)
        directory = private_cache / "default"
        manifest = json.loads((directory / "manifest.json").read_text())
        del manifest["symbols"]
        (directory / "manifest.json").write_text(json.dumps(manifest))
        (directory / "System.map").unlink()
        assert cached_image().system_map is None            # usable as it is
        messages = []
        image = default_image(progress=messages.append)
        assert len(fake_build) == 1 and image.system_map.read_text() == FAKE_MAP
        assert any("kernel symbols" in m for m in messages)
        assert cached_image().system_map == directory / "System.map"
        # a damaged map is made again, still without a rebuild
        (directory / "System.map").write_text(FAKE_MAP.upper())
        assert cached_image().system_map is None
        assert default_image(progress=None).system_map.read_text() == FAKE_MAP
        assert len(fake_build) == 1

    def test_a_kernel_without_symbols_is_noted_once(self, fake_build, private_cache, fake_kernel_symbols):
        fake_kernel_symbols["text"] = None
        messages = []
        image = default_image(progress=messages.append)
        assert image.system_map is None and any("no kernel symbols" in m for m in messages)
        assert default_image(progress=None).system_map is None
        assert fake_kernel_symbols["calls"] == 1 and len(fake_build) == 1   # not tried again

    def test_failed_build_leaves_the_old_image(self, fake_build, private_cache, monkeypatch):
        default_image(progress=None)

        def broken(work, progress):
            (work / "junk").write_bytes(b"x")
            raise ImageError("package linux-image-cloud-amd64 not found")

        monkeypatch.setattr(image_build, "_build", broken)
        with pytest.raises(ImageError, match="not found"):
            build_default_image(rebuild=True, progress=None)
        assert cached_image().kernel_version == "6.1.0-test"
        assert sorted(p.name for p in private_cache.iterdir()) == [".default.lock", "default"]

    def test_cli(self, fake_build, capsys):
        parser = argparse.ArgumentParser(prog="pyvmm")
        sub = parser.add_subparsers(dest="command")
        register_cli(sub)
        args = parser.parse_args(["image", "info"])
        assert run_image_command(args) == 1
        assert "pyvmm image build" in capsys.readouterr().err
        assert run_image_command(parser.parse_args(["image", "build", "--rebuild", "-q"])) == 0
        assert "6.1.0-test" in capsys.readouterr().out
        assert run_image_command(parser.parse_args(["image", "info", "--json"])) == 0
        assert json.loads(capsys.readouterr().out)["kernel_version"] == "6.1.0-test"
        assert run_image_command(parser.parse_args(["image"])) == 2
