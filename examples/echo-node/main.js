// Reads inputData (JSON on stdin) and answers with a greeting, a sum and the input itself.
const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const numbers = input.numbers || [];
console.log(JSON.stringify({
  greeting: `Hello, ${input.name || 'world'}!`,
  sum: numbers.reduce((a, b) => a + b, 0),
  input,
  requestId: process.env.NANOGRID_REQUEST_ID,
}));
