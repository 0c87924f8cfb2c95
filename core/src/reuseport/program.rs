//! The classic BPF program that computes the routing hash inside the kernel for each SYN of the group.
//! Generated once per group: the text form, the group size and the interface table are constants in it.

use libc::sock_filter;

/// The kernel refuses classic programs longer than this (`BPF_MAXINSNS`).
pub const MAX_INSTRUCTIONS: usize = 4096;

/// Packet loads at `SKF_NET_OFF + k` read byte `k` of the IP header: the kernel has pulled the TCP header
/// off before it runs a reuseport program, so only the network-header-relative form is stable.
pub(crate) const NET: u32 = libc::SKF_NET_OFF as u32;
/// The ancillary load of `skb->dev->ifindex`: the interface that Node names after `%` for a link-local peer.
pub(crate) const IFINDEX: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_IFINDEX) as u32;

/// Which text the program hashes for a client, as Node prints `socket.remoteAddress` on that listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextForm {
    /// An IPv4 listener: IPv4 clients only, as `a.b.c.d`.
    Ipv4,
    /// An IPv6 listener (dual-stack on `::`): IPv4 clients as `::ffff:a.b.c.d`, IPv6 clients in RFC 5952
    /// text as libuv prints it, link-local ones with `%ifname` appended.
    Ipv6,
}

impl TextForm {
    /// One line for `--check` and logs: what the kernel hashes for each kind of client.
    pub fn describe(self) -> &'static str {
        match self {
            TextForm::Ipv4 => "kernel routing hashes IPv4 clients as a.b.c.d (Node's remoteAddress)",
            TextForm::Ipv6 => {
                "kernel routing hashes IPv4 clients as ::ffff:a.b.c.d and IPv6 clients as Node's remoteAddress \
                 text (link-local with %ifname for interfaces present at start)"
            }
        }
    }
}

/// A generated program and what went into it.
#[derive(Debug, Clone)]
pub struct Program {
    /// The instructions, ready for `SO_ATTACH_REUSEPORT_CBPF`.
    pub instructions: Vec<sock_filter>,
    /// The interfaces whose names the program appends to link-local clients (index, name).
    pub interfaces: Vec<(u32, String)>,
}

// Scratch slots M[k]. Every one is written at the top of the program, so no path reads an unwritten slot.
const HASH: u32 = 0;
const WORK: u32 = 1;
const CURRENT_RUN: u32 = 2;
const BEST_LEN: u32 = 3;
const BEST_END: u32 = 4;
const BEST_BASE: u32 = 5;
const QUAD: u32 = 6; // 6..=9: the four bytes of an IPv4 address, first to last
const PREFIX: u32 = 10;
const SLOTS_USED: u32 = 11;

// What precedes the dotted quad in the text (the PREFIX slot).
const PREFIX_NONE: u32 = 0;
const PREFIX_COLONS: u32 = 1; // `::a.b.c.d` (libuv's IPv4-compatible form)
const PREFIX_MAPPED: u32 = 2; // `::ffff:a.b.c.d`

/// "No zero run": larger than every word index, so the in-run test fails for all of them.
const NO_RUN: u32 = 9;

/// Generates the program for `form` and a group of `concurrency` listeners. Interfaces whose names do not fit
/// in the instruction limit are left out (from the highest index), and `Program::interfaces` says which stayed.
pub fn generate(form: TextForm, concurrency: u32, interfaces: &[(u32, String)]) -> Result<Program, String> {
    if concurrency == 0 {
        return Err("a reuseport group needs at least one listener".into());
    }
    let mut interfaces: Vec<(u32, String)> = interfaces.to_vec();
    loop {
        let instructions = assemble(form, concurrency, &interfaces)?;
        if instructions.len() <= MAX_INSTRUCTIONS {
            return Ok(Program { instructions, interfaces });
        }
        if interfaces.pop().is_none() {
            return Err(format!(
                "the routing program needs {} instructions (limit {MAX_INSTRUCTIONS})",
                instructions.len()
            ));
        }
    }
}

fn assemble(form: TextForm, concurrency: u32, interfaces: &[(u32, String)]) -> Result<Vec<sock_filter>, String> {
    let mut asm = Assembler::default();
    let quad = asm.label();
    let end = asm.label();
    asm.op(LD_IMM, 0);
    for slot in (HASH + 1)..SLOTS_USED {
        asm.op(ST, slot);
    }
    asm.op(LD_IMM, 5381);
    asm.op(ST, HASH);
    let ipv4 = asm.label();
    if form == TextForm::Ipv6 {
        let (ipv6, to_ipv4) = (asm.label(), asm.label());
        asm.op(LDB_ABS, NET);
        asm.op(RSH_K, 4);
        asm.jump(JEQ_K, 6, ipv6, to_ipv4);
        asm.place(to_ipv4);
        asm.jump_always(ipv4);
        asm.place(ipv6);
        ipv6_text(&mut asm, interfaces, quad, end);
    }
    asm.place(ipv4);
    let prefix = if form == TextForm::Ipv6 { PREFIX_MAPPED } else { PREFIX_NONE };
    load_quad(&mut asm, 12);
    asm.op(LD_IMM, prefix);
    asm.op(ST, PREFIX);
    asm.jump_always(quad);

    asm.place(quad);
    dotted_quad(&mut asm);
    // The prefix comes before the quad in the text, so it is mixed in after it.
    let colons = asm.label();
    let mapped = asm.label();
    asm.op(LD_MEM, PREFIX);
    let not_none = asm.label();
    asm.jump(JEQ_K, PREFIX_NONE, end, not_none);
    asm.place(not_none);
    asm.jump(JEQ_K, PREFIX_COLONS, colons, mapped);
    asm.place(mapped);
    mix_text(&mut asm, "ffff:");
    asm.place(colons);
    mix_text(&mut asm, "::");

    // The shared ending, placed last so that every path reaches it with a forward jump.
    asm.place(end);
    asm.op(LD_MEM, HASH);
    asm.op(MOD_K, concurrency);
    asm.op(RET_A, 0);
    asm.finish()
}

/// IPv6 packets: libuv's `inet_ntop6` text, mixed from its last character to its first.
fn ipv6_text(asm: &mut Assembler, interfaces: &[(u32, String)], quad: Label, end: Label) {
    let word = |i: u32| NET + 8 + 2 * i;
    // Find the first longest run of zero words, tracked as it grows: a run replaces the best one only when
    // it becomes strictly longer, so the first of equal runs wins as in libuv.
    for i in 0..8 {
        let (zero, nonzero, next, longer) = (asm.label(), asm.label(), asm.label(), asm.label());
        asm.op(LDH_ABS, word(i));
        asm.jump(JEQ_K, 0, zero, nonzero);
        asm.place(nonzero);
        asm.op(LD_IMM, 0);
        asm.op(ST, CURRENT_RUN);
        asm.jump_always(next);
        asm.place(zero);
        asm.op(LD_MEM, CURRENT_RUN);
        asm.op(ADD_K, 1);
        asm.op(ST, CURRENT_RUN);
        asm.op(LDX_MEM, BEST_LEN);
        asm.jump(JGT_X, 0, longer, next);
        asm.place(longer);
        asm.op(ST, BEST_LEN);
        asm.op(LD_IMM, i + 1);
        asm.op(ST, BEST_END);
        asm.place(next);
    }
    // A single zero word is not compressed.
    let (has_run, no_run, scanned) = (asm.label(), asm.label(), asm.label());
    asm.op(LD_MEM, BEST_LEN);
    asm.jump(JGE_K, 2, has_run, no_run);
    asm.place(no_run);
    asm.op(LD_IMM, NO_RUN);
    asm.op(ST, BEST_BASE);
    asm.op(ST, BEST_END);
    asm.jump_always(scanned);
    asm.place(has_run);
    asm.op(LDX_MEM, BEST_LEN);
    asm.op(LD_MEM, BEST_END);
    asm.op(SUB_X, 0);
    asm.op(ST, BEST_BASE);
    asm.place(scanned);

    // libuv writes the last two words as a dotted quad after a leading run of 6 (`::a.b.c.d`) or after
    // `::ffff` (a run of 5 then 0xffff). Its third case, a run of 7 with a last word other than 1, is
    // unreachable there (word 6 is inside the run), so it has no branch here.
    let (base_zero, check5, check_ffff, not_embedded) = (asm.label(), asm.label(), asm.label(), asm.label());
    let (compatible, mapped) = (asm.label(), asm.label());
    asm.op(LD_MEM, BEST_BASE);
    asm.jump(JEQ_K, 0, base_zero, not_embedded);
    asm.place(base_zero);
    asm.op(LD_MEM, BEST_LEN);
    asm.jump_far_if(JEQ_K, 6, compatible);
    asm.jump(JEQ_K, 5, check5, not_embedded);
    asm.place(check5);
    asm.op(LDH_ABS, word(5));
    asm.jump(JEQ_K, 0xffff, check_ffff, not_embedded);
    asm.place(check_ffff);
    asm.jump_always(mapped);
    asm.place(not_embedded);

    // Node appends `%ifname` to a link-local (fe80::/10) peer: the scope is the interface the SYN came in on.
    if !interfaces.is_empty() {
        let (link_local, not_link_local, suffix_done) = (asm.label(), asm.label(), asm.label());
        asm.op(LDH_ABS, word(0));
        asm.op(AND_K, 0xffc0);
        asm.jump(JEQ_K, 0xfe80, link_local, not_link_local);
        asm.place(not_link_local);
        asm.jump_always(suffix_done);
        asm.place(link_local);
        asm.op(LDW_ABS, IFINDEX);
        for (index, name) in interfaces {
            let (this, other) = (asm.label(), asm.label());
            asm.jump(JEQ_K, *index, this, other);
            asm.place(this);
            mix_text(asm, &format!("%{name}"));
            asm.jump_always(suffix_done);
            asm.place(other);
        }
        asm.place(suffix_done);
    }

    // A run reaching the last word leaves a trailing `:`.
    let (trailing, no_trailing) = (asm.label(), asm.label());
    asm.op(LD_MEM, BEST_END);
    asm.jump(JEQ_K, 8, trailing, no_trailing);
    asm.place(trailing);
    mix_text(asm, ":");
    asm.place(no_trailing);

    for i in (0..8).rev() {
        let (outside, inside, next) = (asm.label(), asm.label(), asm.label());
        let maybe_inside = asm.label();
        asm.op(LD_MEM, BEST_BASE);
        asm.jump(JGT_K, i, outside, maybe_inside);
        asm.place(maybe_inside);
        asm.op(LD_MEM, BEST_END);
        asm.jump(JGT_K, i, inside, outside);
        // Inside the run: the run's first word stands for the `::` (with the separator of the next word).
        asm.place(inside);
        let run_start = asm.label();
        asm.op(LD_MEM, BEST_BASE);
        asm.jump(JEQ_K, i, run_start, next);
        asm.place(run_start);
        mix_text(asm, ":");
        asm.jump_always(next);
        asm.place(outside);
        hex_word(asm, word(i));
        if i != 0 {
            mix_text(asm, ":");
        }
        asm.place(next);
    }
    asm.jump_always(end);

    asm.place(compatible);
    asm.op(LD_IMM, PREFIX_COLONS);
    let load = asm.label();
    asm.jump_always(load);
    asm.place(mapped);
    asm.op(LD_IMM, PREFIX_MAPPED);
    asm.place(load);
    asm.op(ST, PREFIX);
    load_quad(asm, 20);
    asm.jump_always(quad);
}

/// `%x` of one 16-bit word, lowest digit first, no leading zeros (a zero word prints `0`).
fn hex_word(asm: &mut Assembler, offset: u32) {
    let done = asm.label();
    asm.op(LDH_ABS, offset);
    asm.op(ST, WORK);
    for digit in 0..4 {
        if digit > 0 {
            asm.op(LD_MEM, WORK);
            asm.op(RSH_K, 4);
            let more = asm.label();
            asm.jump(JEQ_K, 0, done, more);
            asm.place(more);
            asm.op(ST, WORK);
        }
        let (letter, character) = (asm.label(), asm.label());
        asm.op(AND_K, 0xf);
        asm.jump(JGE_K, 10, letter, character);
        asm.place(letter);
        asm.op(ADD_K, u32::from(b'a' - b'0' - 10));
        asm.place(character);
        asm.op(ADD_K, u32::from(b'0'));
        mix_x(asm);
    }
    asm.place(done);
}

/// Copies the four bytes of an IPv4 address at IP-header offset `offset` into the QUAD slots.
fn load_quad(asm: &mut Assembler, offset: u32) {
    for byte in 0..4 {
        asm.op(LDB_ABS, NET + offset + byte);
        asm.op(ST, QUAD + byte);
    }
}

/// `a.b.c.d` from the QUAD slots, from `d`'s last digit to `a`'s first.
fn dotted_quad(asm: &mut Assembler) {
    for byte in (0..4).rev() {
        decimal_byte(asm, QUAD + byte);
        if byte != 0 {
            mix_text(asm, ".");
        }
    }
}

/// The decimal digits of the byte in `slot`, units first, by `DIV`/`MOD` (no loops in classic BPF).
fn decimal_byte(asm: &mut Assembler, slot: u32) {
    let done = asm.label();
    asm.op(LD_MEM, slot);
    asm.op(MOD_K, 10);
    asm.op(ADD_K, u32::from(b'0'));
    mix_x(asm);
    for (threshold, divisor, modulus) in [(10, 10, Some(10)), (100, 100, None)] {
        let more = asm.label();
        asm.op(LD_MEM, slot);
        asm.jump(JGE_K, threshold, more, done);
        asm.place(more);
        asm.op(DIV_K, divisor);
        if let Some(modulus) = modulus {
            asm.op(MOD_K, modulus);
        }
        asm.op(ADD_K, u32::from(b'0'));
        mix_x(asm);
    }
    asm.place(done);
}

/// One string-hash step with the character in A: `hash = hash * 33 ^ A`.
fn mix_x(asm: &mut Assembler) {
    asm.op(TAX, 0);
    asm.op(LD_MEM, HASH);
    asm.op(MUL_K, 33);
    asm.op(XOR_X, 0);
    asm.op(ST, HASH);
}

/// String-hash steps for a constant text, from its last character to its first.
fn mix_text(asm: &mut Assembler, text: &str) {
    asm.op(LD_MEM, HASH);
    let units: Vec<u16> = text.encode_utf16().collect();
    for &unit in units.iter().rev() {
        asm.op(MUL_K, 33);
        asm.op(XOR_K, u32::from(unit));
    }
    asm.op(ST, HASH);
}

// Instruction codes (linux/filter.h), composed once so the generator reads like the assembly it emits.
const fn code(parts: u32) -> u16 {
    parts as u16
}
pub(crate) const LD_IMM: u16 = code(libc::BPF_LD | libc::BPF_IMM);
pub(crate) const LD_MEM: u16 = code(libc::BPF_LD | libc::BPF_MEM);
pub(crate) const LDW_ABS: u16 = code(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS);
pub(crate) const LDH_ABS: u16 = code(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS);
pub(crate) const LDB_ABS: u16 = code(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS);
pub(crate) const LDX_MEM: u16 = code(libc::BPF_LDX | libc::BPF_MEM);
pub(crate) const ST: u16 = code(libc::BPF_ST);
pub(crate) const ADD_K: u16 = code(libc::BPF_ALU | libc::BPF_ADD | libc::BPF_K);
pub(crate) const SUB_X: u16 = code(libc::BPF_ALU | libc::BPF_SUB | libc::BPF_X);
pub(crate) const MUL_K: u16 = code(libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K);
pub(crate) const DIV_K: u16 = code(libc::BPF_ALU | libc::BPF_DIV | libc::BPF_K);
pub(crate) const MOD_K: u16 = code(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K);
pub(crate) const AND_K: u16 = code(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K);
pub(crate) const RSH_K: u16 = code(libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K);
pub(crate) const XOR_K: u16 = code(libc::BPF_ALU | libc::BPF_XOR | libc::BPF_K);
pub(crate) const XOR_X: u16 = code(libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X);
pub(crate) const JA: u16 = code(libc::BPF_JMP | libc::BPF_JA);
pub(crate) const JEQ_K: u16 = code(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K);
pub(crate) const JGT_K: u16 = code(libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K);
pub(crate) const JGE_K: u16 = code(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K);
pub(crate) const JGT_X: u16 = code(libc::BPF_JMP | libc::BPF_JGT | libc::BPF_X);
pub(crate) const RET_A: u16 = code(libc::BPF_RET | libc::BPF_A);
pub(crate) const TAX: u16 = code(libc::BPF_MISC | libc::BPF_TAX);

/// A place in the program, resolved when the program is finished.
#[derive(Debug, Clone, Copy)]
struct Label(usize);

enum Op {
    Plain(u16, u32),
    /// A conditional jump: its offsets are 8 bits, so both targets must lie within 255 instructions.
    Branch(u16, u32, Label, Label),
    /// `JA`: a 32-bit offset, for everything farther.
    Always(Label),
}

/// A forward-only assembler with labels; fails rather than emit a jump the kernel would refuse.
#[derive(Default)]
struct Assembler {
    ops: Vec<Op>,
    labels: Vec<Option<usize>>,
}

impl Assembler {
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn place(&mut self, label: Label) {
        self.labels[label.0] = Some(self.ops.len());
    }

    fn op(&mut self, code: u16, k: u32) {
        self.ops.push(Op::Plain(code, k));
    }

    fn jump(&mut self, code: u16, k: u32, if_true: Label, if_false: Label) {
        self.ops.push(Op::Branch(code, k, if_true, if_false));
    }

    fn jump_always(&mut self, target: Label) {
        self.ops.push(Op::Always(target));
    }

    /// A conditional jump to a label that may be out of an 8-bit offset's reach: the test skips a `JA`.
    fn jump_far_if(&mut self, code: u16, k: u32, target: Label) {
        let (far, near) = (self.label(), self.label());
        self.jump(code, k, far, near);
        self.place(far);
        self.jump_always(target);
        self.place(near);
    }

    fn finish(self) -> Result<Vec<sock_filter>, String> {
        let target = |pc: usize, label: Label| -> Result<usize, String> {
            let at = self.labels[label.0].ok_or_else(|| format!("instruction {pc}: jump to an unplaced label"))?;
            at.checked_sub(pc + 1).ok_or_else(|| format!("instruction {pc}: backward jump"))
        };
        let near = |pc: usize, label: Label| -> Result<u8, String> {
            let offset = target(pc, label)?;
            u8::try_from(offset).map_err(|_| format!("instruction {pc}: conditional jump of {offset} (max 255)"))
        };
        let mut out = Vec::with_capacity(self.ops.len());
        for (pc, op) in self.ops.iter().enumerate() {
            out.push(match *op {
                Op::Plain(code, k) => sock_filter { code, jt: 0, jf: 0, k },
                Op::Branch(code, k, if_true, if_false) => {
                    sock_filter { code, jt: near(pc, if_true)?, jf: near(pc, if_false)?, k }
                }
                Op::Always(label) => sock_filter { code: JA, jt: 0, jf: 0, k: target(pc, label)? as u32 },
            });
        }
        Ok(out)
    }
}
