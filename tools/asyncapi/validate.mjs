// Validates an AsyncAPI document with the AsyncAPI parser (the one the AsyncAPI CLI runs):
// prints one line per finding and exits 1 when any is an error, 0 otherwise.
import { readFile } from "node:fs/promises";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";

const [path] = process.argv.slice(2);
if (!path) {
  console.error("usage: node validate.mjs FILE");
  process.exit(2);
}
const parser = new Parser();
const { document, diagnostics } = await parser.parse(await readFile(path, "utf8"), { source: path });
const severity = Object.fromEntries(Object.entries(DiagnosticSeverity).map(([k, v]) => [v, k]));
for (const d of diagnostics) {
  const where = d.path.length ? d.path.join("/") : "(document)";
  console.log(`${severity[d.severity] ?? d.severity}: ${where}: ${d.message} [${d.code}]`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error).length;
if (!document || errors) {
  console.log(`invalid: ${errors} error(s)`);
  process.exit(1);
}
console.log(`valid AsyncAPI ${document.version()}: ${document.channels().length} channels, ${document.operations().length} operations, ${document.messages().length} messages`);
