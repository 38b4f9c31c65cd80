"""A seccomp filter for bubblewrap sandboxes: a hand-assembled classic BPF program, no libseccomp.

The policy follows Docker's default profile as it applies to a container started with
`cap_drop=ALL`: the calls that profile refuses to a process without capabilities -- the kernel
surface container escapes use -- fail with EPERM, everything else reaches the kernel. Unlike
Docker's profile this is a *deny* list: a system call added by a newer kernel is allowed until it
is listed here.

Denied (EPERM), on x86_64 and aarch64 alike unless noted:

- keys: `add_key`, `keyctl`, `request_key` (the kernel keyring is not namespaced);
- kernel extension and tracing: `bpf`, `perf_event_open`, `userfaultfd`, `io_uring_setup`,
  `io_uring_enter`, `io_uring_register`, `fanotify_init`, `lookup_dcookie`, `syslog`;
- kernel and machine: `init_module`, `finit_module`, `delete_module`, `kexec_load`,
  `kexec_file_load`, `reboot`, `swapon`, `swapoff`, `acct`, `quotactl`, `quotactl_fd`,
  `settimeofday`, `clock_settime`, `vhangup`, `nfsservctl`; x86_64 only: `iopl`, `ioperm`,
  `create_module`, `get_kernel_syms`, `query_module`, `uselib`, `ustat`, `sysfs`, `_sysctl`;
- mounts and namespaces: `mount`, `umount2`, `pivot_root`, `fsopen`, `fsconfig`, `fsmount`,
  `fspick`, `move_mount`, `open_tree`, `mount_setattr`, `setns`; `unshare` and `clone` when
  their flags ask for any new namespace; `clone3` fails with ENOSYS instead (its flags sit behind
  a pointer the filter cannot read; libc then falls back to `clone`, as under Docker);
- file handles: `open_by_handle_at`, `name_to_handle_at`;
- other processes: `ptrace`, `process_vm_readv`, `process_vm_writev`, `process_madvise`,
  `pidfd_getfd`, `kcmp` (stricter than Docker, which allows `ptrace` on kernels >= 4.8: no
  debugger or `strace` works in the sandbox);
- `personality` with anything but the values Docker allows (0, 8, 0x20000, 0x20008, 0xffffffff);
- `ioctl(TIOCSTI)` and `ioctl(TIOCLINUX)`, which push input into a terminal.

A call made with any other architecture's convention -- i386 `int 0x80` on x86_64, AArch32 on
aarch64, x32 (`nr & 0x40000000`) -- kills the process: the tables above would not apply to it.

Usage: `FILTER` is the program as `struct sock_filter[]` bytes, the format `bwrap --seccomp FD`
reads and `prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &(struct sock_fprog){len(FILTER) // 8,
FILTER})` installs.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
EPERM = 1
ENOSYS = 38

# Classic BPF opcodes (linux/bpf_common.h) and the offsets of `struct seccomp_data`.
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_NR, _ARCH = 0, 4


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of argument `index` (both architectures are little-endian)."""
    return 16 + 8 * index


CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
"""Only meaningful to `unshare`: for `clone` this bit is part of the exit signal."""
CLONE_NAMESPACES = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

DENIED = (
    "acct",
    "add_key",
    "bpf",
    "clock_settime",
    "create_module",
    "delete_module",
    "fanotify_init",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pidfd_getfd",
    "pivot_root",
    "process_madvise",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "settimeofday",
    "setns",
    "swapoff",
    "swapon",
    "syslog",
    "_sysctl",
    "sysfs",
    "umount2",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
)
"""Calls refused outright with EPERM (names missing from an architecture's table are skipped)."""

# System call numbers, from the kernel's uapi headers (asm/unistd_64.h for x86_64, the generic
# asm-generic/unistd.h table for aarch64); tests/sandbox/test_bubblewrap_hardening.py checks
# them against the headers when these are installed.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "acct": 163,
        "add_key": 248,
        "bpf": 321,
        "clock_settime": 227,
        "clone": 56,
        "clone3": 435,
        "create_module": 174,
        "delete_module": 176,
        "fanotify_init": 300,
        "finit_module": 313,
        "fsconfig": 431,
        "fsmount": 432,
        "fsopen": 430,
        "fspick": 433,
        "get_kernel_syms": 177,
        "init_module": 175,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "io_uring_setup": 425,
        "ioctl": 16,
        "ioperm": 173,
        "iopl": 172,
        "kcmp": 312,
        "kexec_file_load": 320,
        "kexec_load": 246,
        "keyctl": 250,
        "lookup_dcookie": 212,
        "mount": 165,
        "mount_setattr": 442,
        "move_mount": 429,
        "name_to_handle_at": 303,
        "nfsservctl": 180,
        "open_by_handle_at": 304,
        "open_tree": 428,
        "perf_event_open": 298,
        "personality": 135,
        "pidfd_getfd": 438,
        "pivot_root": 155,
        "process_madvise": 440,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "ptrace": 101,
        "query_module": 178,
        "quotactl": 179,
        "quotactl_fd": 443,
        "reboot": 169,
        "request_key": 249,
        "settimeofday": 164,
        "setns": 308,
        "swapoff": 168,
        "swapon": 167,
        "syslog": 103,
        "_sysctl": 156,
        "sysfs": 139,
        "umount2": 166,
        "unshare": 272,
        "uselib": 134,
        "userfaultfd": 323,
        "ustat": 136,
        "vhangup": 153,
    },
    "aarch64": {
        "acct": 89,
        "add_key": 217,
        "bpf": 280,
        "clock_settime": 112,
        "clone": 220,
        "clone3": 435,
        "delete_module": 106,
        "fanotify_init": 262,
        "finit_module": 273,
        "fsconfig": 431,
        "fsmount": 432,
        "fsopen": 430,
        "fspick": 433,
        "init_module": 105,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "io_uring_setup": 425,
        "ioctl": 29,
        "kcmp": 272,
        "kexec_file_load": 294,
        "kexec_load": 104,
        "keyctl": 219,
        "lookup_dcookie": 18,
        "mount": 40,
        "mount_setattr": 442,
        "move_mount": 429,
        "name_to_handle_at": 264,
        "nfsservctl": 42,
        "open_by_handle_at": 265,
        "open_tree": 428,
        "perf_event_open": 241,
        "personality": 92,
        "pidfd_getfd": 438,
        "pivot_root": 41,
        "process_madvise": 440,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "ptrace": 117,
        "quotactl": 60,
        "quotactl_fd": 443,
        "reboot": 142,
        "request_key": 218,
        "settimeofday": 170,
        "setns": 268,
        "swapoff": 225,
        "swapon": 224,
        "syslog": 116,
        "umount2": 39,
        "unshare": 97,
        "userfaultfd": 282,
        "vhangup": 58,
    },
}
ARCHES = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}


# ------------------------------------------------------------------------------ assembler


@dataclass(frozen=True, slots=True)
class _Insn:
    """One instruction; jump targets are label names, resolved by `_assemble`."""

    code: int
    k: int = 0
    jt: str | None = None
    jf: str | None = None
    label: str | None = None
    """A label naming this instruction."""


def _assemble(program: Sequence[_Insn]) -> bytes:
    """Resolve labels to the forward offsets classic BPF needs and pack `struct sock_filter`s.

    Raises:
        ValueError: a jump goes backwards, to an unknown label or further than 255 instructions.
    """
    where = {insn.label: i for i, insn in enumerate(program) if insn.label is not None}
    out = bytearray()
    for i, insn in enumerate(program):
        offsets = []
        for target in (insn.jt, insn.jf):
            if target is None:
                offsets.append(0)
                continue
            if target not in where:
                msg = f"seccomp program: jump to unknown label {target!r}"
                raise ValueError(msg)
            offset = where[target] - i - 1
            if not 0 <= offset <= 255:
                msg = f"seccomp program: jump to {target!r} spans {offset} instructions"
                raise ValueError(msg)
            offsets.append(offset)
        out += struct.pack("=HBBI", insn.code, offsets[0], offsets[1], insn.k)
    return bytes(out)


def _arch_block(arch: str) -> list[_Insn]:
    """Checks of one architecture's calls, starting at label `<arch>.start`."""
    table = SYSCALLS[arch]

    def at(name: str) -> str:
        return f"{arch}.{name}"

    block = [_Insn(_LD_W_ABS, _NR, label=at("start"))]
    if arch == "x86_64":
        # x32 calls carry the x32 bit; -1 (a call skipped by a tracer) is let through as libseccomp
        # does: the kernel answers it with ENOSYS.
        block += [
            _Insn(_JGE_K, X32_SYSCALL_BIT, jt=at("high"), jf=at("native")),
            _Insn(_JEQ_K, 0xFFFFFFFF, jt=at("allow"), jf=at("kill"), label=at("high")),
        ]
    denied = [table[name] for name in DENIED if name in table]
    block += [
        _Insn(_JEQ_K, denied[0], jt=at("eperm"), label=at("native")),
        *[_Insn(_JEQ_K, nr, jt=at("eperm")) for nr in denied[1:]],
        _Insn(_JEQ_K, table["clone"], jt=at("clone")),
        _Insn(_JEQ_K, table["unshare"], jt=at("unshare")),
        _Insn(_JEQ_K, table["clone3"], jt=at("enosys")),
        _Insn(_JEQ_K, table["ioctl"], jt=at("ioctl")),
        _Insn(_JEQ_K, table["personality"], jt=at("personality")),
        _Insn(_RET_K, SECCOMP_RET_ALLOW, label=at("allow")),
        # clone(flags, ...) and unshare(flags): no new namespace.
        _Insn(_LD_W_ABS, _arg_low(0), label=at("clone")),
        _Insn(_JSET_K, CLONE_NAMESPACES, jt=at("eperm"), jf=at("allow_arg")),
        _Insn(_LD_W_ABS, _arg_low(0), label=at("unshare")),
        _Insn(_JSET_K, CLONE_NAMESPACES | CLONE_NEWTIME, jt=at("eperm"), jf=at("allow_arg")),
        # ioctl(fd, request): the request is an unsigned int, so its low word is all of it.
        _Insn(_LD_W_ABS, _arg_low(1), label=at("ioctl")),
        _Insn(_JEQ_K, TIOCSTI, jt=at("eperm")),
        _Insn(_JEQ_K, TIOCLINUX, jt=at("eperm"), jf=at("allow_arg")),
        _Insn(_LD_W_ABS, _arg_low(0), label=at("personality")),
        *[_Insn(_JEQ_K, value, jt=at("allow_arg")) for value in PERSONALITY_ALLOWED],
        _Insn(_RET_K, SECCOMP_RET_ERRNO | EPERM, label=at("eperm")),
        _Insn(_RET_K, SECCOMP_RET_ALLOW, label=at("allow_arg")),
        _Insn(_RET_K, SECCOMP_RET_ERRNO | ENOSYS, label=at("enosys")),
        _Insn(_RET_K, SECCOMP_RET_KILL_PROCESS, label=at("kill")),
    ]
    return block


def build_filter(arches: Sequence[str] = ("x86_64", "aarch64")) -> bytes:
    """The filter program for `arches` (keys of `SYSCALLS`); any other architecture is killed."""
    program = [_Insn(_LD_W_ABS, _ARCH)]
    program += [_Insn(_JEQ_K, ARCHES[arch], jt=f"{arch}.start") for arch in arches]
    program.append(_Insn(_RET_K, SECCOMP_RET_KILL_PROCESS))
    for arch in arches:
        program += _arch_block(arch)
    return _assemble(program)


FILTER = build_filter()
"""The program every bubblewrap sandbox process runs under."""
