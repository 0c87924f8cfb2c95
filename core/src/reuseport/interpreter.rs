//! A classic BPF interpreter and the kernel checker's static rules, for testing the generated program.
//! Semantics follow the kernel (net/core/filter.c): a failed load or a division by a zero X returns 0.

use libc::sock_filter;

/// What a reuseport program sees of a SYN: the IP header and the incoming interface.
pub struct Packet<'a> {
    /// The IP header and what follows it (`SKF_NET_OFF + k` reads byte `k`).
    pub network: &'a [u8],
    /// `skb->dev->ifindex`.
    pub ifindex: u32,
}

/// The result of one run.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The returned value (the socket index for a reuseport program).
    pub value: u32,
    /// Instructions executed, the return included.
    pub steps: usize,
    /// The scratch slots at the end (the generated program keeps the full hash in M[0]).
    pub scratch: [u32; 16],
}

const CLASS: u16 = 0x07;
const SIZE: u16 = 0x18;
const MODE: u16 = 0xe0;
const OP: u16 = 0xf0;
const SOURCE: u16 = 0x08;

fn class(code: u16) -> u32 {
    u32::from(code & CLASS)
}

/// Loads `size` bytes at `k` the way `bpf_internal_load_pointer_neg_helper` resolves offsets.
fn load(packet: &Packet, k: u32, size: usize) -> Option<u32> {
    let k = k as i32;
    if k >= libc::SKF_AD_OFF {
        return match k - libc::SKF_AD_OFF {
            off if off == libc::SKF_AD_IFINDEX && size == 4 => Some(packet.ifindex),
            _ => None,
        };
    }
    // Offsets from 0 read past the TCP header (a SYN carries no payload) and the link layer is not
    // modelled: the generated program reads neither.
    if !(libc::SKF_NET_OFF..libc::SKF_AD_OFF).contains(&k) {
        return None;
    }
    let start = (k - libc::SKF_NET_OFF) as usize;
    let bytes = packet.network.get(start..start.checked_add(size)?)?;
    Some(bytes.iter().fold(0u32, |value, &byte| (value << 8) | u32::from(byte)))
}

/// Runs `program` on `packet`. Panics only on a program the checker would refuse (a test failure).
pub fn run(program: &[sock_filter], packet: &Packet) -> Outcome {
    let (mut a, mut x, mut memory) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0usize;
    let mut steps = 0usize;
    loop {
        let instruction = program[pc];
        let (code, k) = (instruction.code, instruction.k);
        steps += 1;
        pc += 1;
        let size = match code & SIZE {
            0x00 => 4,
            0x08 => 2,
            _ => 1,
        };
        let aborted = Outcome { value: 0, steps, scratch: memory };
        match class(code) {
            libc::BPF_LD => {
                a = match u32::from(code & MODE) {
                    libc::BPF_IMM => k,
                    libc::BPF_MEM => memory[k as usize],
                    libc::BPF_LEN => packet.network.len() as u32,
                    libc::BPF_ABS => match load(packet, k, size) {
                        Some(value) => value,
                        None => return aborted,
                    },
                    libc::BPF_IND => match load(packet, x.wrapping_add(k), size) {
                        Some(value) => value,
                        None => return aborted,
                    },
                    mode => panic!("instruction {}: LD mode {mode:#x}", pc - 1),
                }
            }
            libc::BPF_LDX => {
                x = match u32::from(code & MODE) {
                    libc::BPF_IMM => k,
                    libc::BPF_MEM => memory[k as usize],
                    libc::BPF_LEN => packet.network.len() as u32,
                    libc::BPF_MSH => match load(packet, k, 1) {
                        Some(value) => 4 * (value & 0xf),
                        None => return aborted,
                    },
                    mode => panic!("instruction {}: LDX mode {mode:#x}", pc - 1),
                }
            }
            libc::BPF_ST => memory[k as usize] = a,
            libc::BPF_STX => memory[k as usize] = x,
            libc::BPF_ALU => {
                let operand = if code & SOURCE != 0 { x } else { k };
                a = match u32::from(code & OP) {
                    libc::BPF_ADD => a.wrapping_add(operand),
                    libc::BPF_SUB => a.wrapping_sub(operand),
                    libc::BPF_MUL => a.wrapping_mul(operand),
                    libc::BPF_DIV | libc::BPF_MOD if operand == 0 => return aborted,
                    libc::BPF_DIV => a / operand,
                    libc::BPF_MOD => a % operand,
                    libc::BPF_OR => a | operand,
                    libc::BPF_AND => a & operand,
                    libc::BPF_LSH => a.wrapping_shl(operand),
                    libc::BPF_RSH => a.wrapping_shr(operand),
                    libc::BPF_NEG => a.wrapping_neg(),
                    libc::BPF_XOR => a ^ operand,
                    op => panic!("instruction {}: ALU op {op:#x}", pc - 1),
                }
            }
            libc::BPF_JMP => {
                let operand = if code & SOURCE != 0 { x } else { k };
                let taken = match u32::from(code & OP) {
                    libc::BPF_JA => {
                        pc += k as usize;
                        continue;
                    }
                    libc::BPF_JEQ => a == operand,
                    libc::BPF_JGT => a > operand,
                    libc::BPF_JGE => a >= operand,
                    libc::BPF_JSET => a & operand != 0,
                    op => panic!("instruction {}: JMP op {op:#x}", pc - 1),
                };
                pc += usize::from(if taken { instruction.jt } else { instruction.jf });
            }
            libc::BPF_RET => {
                let value = if u32::from(code) & libc::BPF_A != 0 { a } else { k };
                return Outcome { value, steps, scratch: memory };
            }
            libc::BPF_MISC => {
                if u32::from(code) & libc::BPF_TXA != 0 {
                    a = x;
                } else {
                    x = a;
                }
            }
            other => panic!("instruction {}: class {other:#x}", pc - 1),
        }
    }
}

/// The kernel's static rules (`bpf_check_classic`, `check_load_and_stores`): length, jump targets inside
/// the program, a return last, constant divisors and shifts in range, and no scratch slot read on a path
/// that has not written it.
pub fn check(program: &[sock_filter]) -> Result<(), String> {
    let len = program.len();
    if len == 0 || len > super::program::MAX_INSTRUCTIONS {
        return Err(format!("{len} instructions"));
    }
    for (pc, instruction) in program.iter().enumerate() {
        let code = instruction.code;
        let k = instruction.k;
        match class(code) {
            libc::BPF_ALU if code & SOURCE == 0 => match u32::from(code & OP) {
                libc::BPF_DIV | libc::BPF_MOD if k == 0 => return Err(format!("{pc}: division by zero")),
                libc::BPF_LSH | libc::BPF_RSH if k >= 32 => return Err(format!("{pc}: shift by {k}")),
                _ => {}
            },
            libc::BPF_LD | libc::BPF_LDX | libc::BPF_ST | libc::BPF_STX
                if (u32::from(code & MODE) == libc::BPF_MEM || matches!(class(code), libc::BPF_ST | libc::BPF_STX))
                    && k >= 16 =>
            {
                return Err(format!("{pc}: scratch slot {k}"));
            }
            libc::BPF_JMP => {
                let targets = if u32::from(code & OP) == libc::BPF_JA {
                    [k as usize, k as usize]
                } else {
                    [usize::from(instruction.jt), usize::from(instruction.jf)]
                };
                if targets.iter().any(|offset| pc + 1 + offset >= len) {
                    return Err(format!("{pc}: jump past the end"));
                }
            }
            _ => {}
        }
    }
    if class(program[len - 1].code) != libc::BPF_RET {
        return Err("the last instruction is not a return".into());
    }
    // check_load_and_stores: every jump is forward, so one pass in order sees every edge into a pc first.
    let mut masks = vec![u16::MAX; len];
    let mut valid = 0u16;
    for (pc, instruction) in program.iter().enumerate() {
        let code = instruction.code;
        let k = instruction.k;
        valid &= masks[pc];
        match class(code) {
            libc::BPF_ST | libc::BPF_STX => valid |= 1 << k,
            libc::BPF_LD | libc::BPF_LDX if u32::from(code & MODE) == libc::BPF_MEM && valid & (1 << k) == 0 => {
                return Err(format!("{pc}: reads M[{k}] before every path wrote it"));
            }
            libc::BPF_JMP if u32::from(code & OP) == libc::BPF_JA => {
                masks[pc + 1 + k as usize] &= valid;
                valid = u16::MAX;
            }
            libc::BPF_JMP => {
                masks[pc + 1 + usize::from(instruction.jt)] &= valid;
                masks[pc + 1 + usize::from(instruction.jf)] &= valid;
                valid = u16::MAX;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::program::{generate, Program, TextForm, JA, LD_MEM, RET_A};
    use super::*;
    use crate::hash::{node_address_text, string_hash};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    const GROUP_SIZES: [u32; 7] = [1, 2, 3, 4, 7, 64, 1000];
    const LOOPBACK: u32 = 1;

    fn table() -> Vec<(u32, String)> {
        vec![(LOOPBACK, "lo".into()), (2, "eth0".into()), (7, "veth-sticky1".into())]
    }

    fn ipv4_header(source: Ipv4Addr) -> Vec<u8> {
        let mut header = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        header.extend_from_slice(&source.octets());
        header.extend_from_slice(&[127, 0, 0, 1]);
        header
    }

    fn ipv6_header(source: Ipv6Addr) -> Vec<u8> {
        let mut header = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
        header.extend_from_slice(&source.octets());
        header.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        header
    }

    /// The text Node prints on a listener of `form` for a client, `%ifname` included.
    fn node_text(form: TextForm, source: IpAddr, ifindex: u32, interfaces: &[(u32, String)]) -> String {
        match (form, source) {
            (TextForm::Ipv4, ip) => node_address_text(ip),
            (TextForm::Ipv6, IpAddr::V4(v4)) => node_address_text(IpAddr::V6(v4.to_ipv6_mapped())),
            (TextForm::Ipv6, IpAddr::V6(v6)) => {
                let mut text = node_address_text(IpAddr::V6(v6));
                if v6.segments()[0] & 0xffc0 == 0xfe80 {
                    if let Some((_, name)) = interfaces.iter().find(|(index, _)| *index == ifindex) {
                        text = format!("{text}%{name}");
                    }
                }
                text
            }
        }
    }

    /// Runs the program for one client and checks the full hash and the returned index; returns the steps.
    fn check_client(program: &Program, form: TextForm, n: u32, source: IpAddr, ifindex: u32) -> usize {
        let header = match source {
            IpAddr::V4(v4) => ipv4_header(v4),
            IpAddr::V6(v6) => ipv6_header(v6),
        };
        let outcome = run(&program.instructions, &Packet { network: &header, ifindex });
        let text = node_text(form, source, ifindex, &program.interfaces);
        let hash = string_hash(&text);
        assert_eq!(outcome.scratch[0], hash, "hash of {text:?} ({form:?})");
        assert_eq!(outcome.value, hash % n, "index of {text:?} ({form:?}, {n} listeners)");
        outcome.steps
    }

    /// A fixed-seed generator (splitmix64): the same addresses on every run.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// A word of one to four hex digits, or zero half of the time, so zero runs of every shape occur.
        fn word(&mut self) -> u16 {
            if self.below(2) == 0 {
                return 0;
            }
            (self.next() as u16) >> (4 * self.below(4))
        }

        fn ipv6(&mut self) -> Ipv6Addr {
            let mut words: [u16; 8] = std::array::from_fn(|_| self.word());
            match self.below(10) {
                0 => words = [0, 0, 0, 0, 0, 0xffff, self.next() as u16, self.next() as u16],
                1 => words = [0, 0, 0, 0, 0, 0, self.word().max(1), self.next() as u16],
                2 => words[0] = 0xfe80 | (self.next() as u16 & 0x3f),
                3 => words = [0; 8].map(|_| if self.below(4) == 0 { self.word() } else { 0 }),
                _ => {}
            }
            Ipv6Addr::from(words)
        }
    }

    #[test]
    fn every_contract_vector_hashes_in_the_program() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/testdata/string-hash-vectors.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let vectors: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut checked = 0;
        for vector in vectors["vectors"].as_array().unwrap() {
            let Ok(ip) = vector["input"].as_str().unwrap().parse::<IpAddr>() else { continue };
            let expected = vector["hash"].as_u64().unwrap() as u32;
            assert_eq!(string_hash(vector["text"].as_str().unwrap()), expected);
            let form = if ip.is_ipv4() { TextForm::Ipv4 } else { TextForm::Ipv6 };
            for n in GROUP_SIZES {
                let program = generate(form, n, &table()).unwrap();
                // The vector's own text is Node's text: the program's hash must be the vector's hash.
                let header = match ip {
                    IpAddr::V4(v4) => ipv4_header(v4),
                    IpAddr::V6(v6) => ipv6_header(v6),
                };
                let outcome = run(&program.instructions, &Packet { network: &header, ifindex: 99 });
                assert_eq!(outcome.scratch[0], expected, "{}", vector["text"]);
                assert_eq!(outcome.value, expected % n);
                check_client(&generate(TextForm::Ipv6, n, &table()).unwrap(), TextForm::Ipv6, n, ip, 99);
            }
            checked += 1;
        }
        assert!(checked >= 30, "only {checked} vectors");
    }

    #[test]
    fn random_ipv4_clients_get_the_handoff_index() {
        let mut random = Random(0x5eed_0004);
        let mut longest = [0usize; 2];
        for (slot, form) in [TextForm::Ipv4, TextForm::Ipv6].into_iter().enumerate() {
            let programs: Vec<Program> = GROUP_SIZES.iter().map(|&n| generate(form, n, &table()).unwrap()).collect();
            for i in 0..100_000 {
                let source = IpAddr::V4(Ipv4Addr::from(random.next() as u32));
                let which = i % GROUP_SIZES.len();
                let steps = check_client(&programs[which], form, GROUP_SIZES[which], source, LOOPBACK);
                longest[slot] = longest[slot].max(steps);
            }
        }
        eprintln!("longest IPv4 path: {} (IPv4 listener), {} (IPv6 listener)", longest[0], longest[1]);
    }

    #[test]
    fn random_ipv6_clients_get_node_text_index() {
        let mut random = Random(0x5eed_0006);
        let interfaces = table();
        let programs: Vec<Program> =
            GROUP_SIZES.iter().map(|&n| generate(TextForm::Ipv6, n, &interfaces).unwrap()).collect();
        let mut longest = 0;
        for i in 0..100_000 {
            let source = random.ipv6();
            // Mostly known interfaces, sometimes one created after the program (no suffix, as documented).
            let ifindex = [LOOPBACK, 2, 7, 42][random.below(4) as usize];
            let which = i % GROUP_SIZES.len();
            let steps = check_client(&programs[which], TextForm::Ipv6, GROUP_SIZES[which], source.into(), ifindex);
            longest = longest.max(steps);
        }
        eprintln!("longest IPv6 path: {longest}");
    }

    #[test]
    fn edge_addresses_match_node_text() {
        let program = generate(TextForm::Ipv6, 7, &table()).unwrap();
        let mut longest = 0;
        for text in [
            "::",
            "::1",
            "1::",
            "::2",
            "1:0:0:2::3",
            "1::2:0:0:3",
            "0:1::",
            "1:2:3:4:5:6:7:0",
            "0:0:1::",
            "::ffff:0.0.0.0",
            "::ffff:1:2",
            "::0.0.1.0",
            "::1:0:0",
            "0:0:0:0:0:1:0:0",
            "1:0:1:0:1:0:1:0",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "fe80::",
            "febf::1",
            "fec0::1",
            "fe80::1:2:3:4:5:6",
            // The longest path: every word four digits, and the last (longest) interface of the table.
            "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: Ipv6Addr = text.parse().unwrap();
            for ifindex in [LOOPBACK, 7, 3] {
                longest = longest.max(check_client(&program, TextForm::Ipv6, 7, ip.into(), ifindex));
            }
        }
        eprintln!("longest path over the edge addresses: {longest}");
    }

    #[test]
    fn generated_programs_pass_the_kernel_checker_rules() {
        for form in [TextForm::Ipv4, TextForm::Ipv6] {
            for n in GROUP_SIZES.into_iter().chain([5, 255, 256, 4096, u32::MAX]) {
                for interfaces in [Vec::new(), table()] {
                    let program = generate(form, n, &interfaces).unwrap();
                    check(&program.instructions).unwrap_or_else(|e| panic!("{form:?} {n}: {e}"));
                }
            }
        }
        let lengths: Vec<usize> = [(TextForm::Ipv4, vec![]), (TextForm::Ipv6, vec![]), (TextForm::Ipv6, table())]
            .into_iter()
            .map(|(form, interfaces)| generate(form, 4, &interfaces).unwrap().instructions.len())
            .collect();
        eprintln!(
            "program lengths: IPv4 {}, IPv6 {} (no interfaces), {} (lo, eth0, veth-sticky1)",
            lengths[0], lengths[1], lengths[2]
        );
        assert!(generate(TextForm::Ipv4, 0, &[]).is_err());
    }

    #[test]
    fn an_interface_table_too_long_for_the_limit_is_cut_to_fit() {
        let many: Vec<(u32, String)> = (1..=400).map(|i| (i, format!("interface{i:06}"))).collect();
        let program = generate(TextForm::Ipv6, 4, &many).unwrap();
        assert!(program.instructions.len() <= 4096 && program.interfaces.len() < many.len());
        assert!(!program.interfaces.is_empty());
        check(&program.instructions).unwrap();
        // The interfaces that stayed still get their suffix.
        let (index, _) = program.interfaces[program.interfaces.len() - 1].clone();
        check_client(&program, TextForm::Ipv6, 4, "fe80::1".parse().unwrap(), index);
    }

    #[test]
    fn the_checker_refuses_what_the_kernel_refuses() {
        let op = |code: u16, jt: u8, jf: u8, k: u32| sock_filter { code, jt, jf, k };
        let read_unwritten = [op(LD_MEM, 0, 0, 3), op(RET_A, 0, 0, 0)];
        assert!(check(&read_unwritten).unwrap_err().contains("M[3]"));
        let written_on_one_path = [
            op(super::super::program::JEQ_K, 0, 1, 0),
            op(super::super::program::ST, 0, 0, 3),
            op(LD_MEM, 0, 0, 3),
            op(RET_A, 0, 0, 0),
        ];
        assert!(check(&written_on_one_path).is_err());
        assert!(check(&[op(JA, 0, 0, 1), op(RET_A, 0, 0, 0)]).is_err());
        assert!(check(&[op(super::super::program::MOD_K, 0, 0, 0), op(RET_A, 0, 0, 0)]).is_err());
        assert!(check(&[op(super::super::program::ST, 0, 0, 0)]).is_err());
    }

    #[test]
    fn a_packet_too_short_aborts_with_zero() {
        let program = generate(TextForm::Ipv6, 7, &table()).unwrap();
        let outcome = run(&program.instructions, &Packet { network: &[0x60, 0, 0], ifindex: 1 });
        assert_eq!(outcome.value, 0);
    }
}
