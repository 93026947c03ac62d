//! Prints the token ids of a text file, one per line (to compare with `llama-tokenize --ids`).
//! Usage: cargo run --release -p llm --example tokenize -- MODEL.gguf TEXT_FILE

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, text] = args.as_slice() else {
        return Err("usage: tokenize MODEL.gguf TEXT_FILE".into());
    };
    let gguf = llm::gguf::GgufFile::open(std::path::Path::new(model))?;
    let t = std::time::Instant::now();
    let tokenizer = llm::Tokenizer::from_gguf(&gguf)?;
    eprintln!("tokenizer built in {:.2}s", t.elapsed().as_secs_f64());
    let text = std::fs::read_to_string(text)?;
    let t = std::time::Instant::now();
    let ids = tokenizer.encode(&text, true)?;
    eprintln!("{} tokens in {:.2}s", ids.len(), t.elapsed().as_secs_f64());
    let body = tokenizer.encode(&text, false)?;
    let round = tokenizer.decode(&body)?;
    eprintln!("decode(encode(text)) == text: {}", round == text);
    if round != text {
        let at = round
            .bytes()
            .zip(text.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "first difference at byte {at}: {:?} vs {:?}",
            &round[at.saturating_sub(20)..(at + 20).min(round.len())],
            &text[at.saturating_sub(20)..(at + 20).min(text.len())]
        );
    }
    for id in ids {
        println!("{id}");
    }
    Ok(())
}
