// E2B's JavaScript code interpreter SDK (@e2b/code-interpreter, pinned in package-lock.json)
// against a live `firkin serve`, unchanged: it reads E2B_API_URL, E2B_SANDBOX_URL and
// E2B_API_KEY. Run by tests/sdk/test_code_interpreter.py with the languages to try as
// arguments (`python`, `js`); exits non-zero with the first difference it finds.
import assert from 'node:assert/strict'
import { Sandbox } from '@e2b/code-interpreter'

const languages = process.argv.slice(2)
if (languages.length === 0) {
  console.error('usage: code_interpreter.mjs python|js ...')
  process.exit(2)
}

// The same stateful two-step example in each language, as the Python suite runs it.
const examples = {
  python: { language: undefined, define: 'x = 21', use: 'x * 2', print: "print('hello')" },
  js: { language: 'js', define: 'var x = 21', use: 'x * 2', print: "console.log('hello')" },
}

const started = performance.now()
const sbx = await Sandbox.create({ timeoutMs: 300_000 })
console.log(`create ${((performance.now() - started) / 1000).toFixed(2)} s`)
try {
  for (const name of languages) {
    const ex = examples[name]
    assert.ok(ex, `no example for ${name}`)
    // The default context serves Python; other languages get a context of their own.
    const context = ex.language ? await sbx.createCodeContext({ language: ex.language }) : undefined
    const opts = context ? { context } : {}

    const t = performance.now()
    const first = await sbx.runCode(ex.define, opts)
    console.log(`${name}: first runCode ${((performance.now() - t) / 1000).toFixed(2)} s`)
    assert.equal(first.error, undefined, `${name}: ${JSON.stringify(first.error)}`)
    const second = await sbx.runCode(ex.use, opts)
    assert.equal(second.error, undefined, `${name}: ${JSON.stringify(second.error)}`)
    assert.equal(second.text, '42', `${name}: ${ex.use} gave ${JSON.stringify(second.text)}`)

    const lines = []
    const printed = await sbx.runCode(ex.print, { ...opts, onStdout: (m) => lines.push(m.line) })
    assert.equal(printed.error, undefined, `${name}: ${JSON.stringify(printed.error)}`)
    assert.equal(lines.join(''), 'hello\n', `${name}: stdout callback got ${JSON.stringify(lines)}`)
    assert.deepEqual(printed.logs.stdout, ['hello\n'])

    const failed = await sbx.runCode(name === 'python' ? '1/0' : "throw new Error('boom')", opts)
    assert.ok(failed.error, `${name}: an exception gave no error`)
    if (name === 'python') assert.equal(failed.error.name, 'ZeroDivisionError')
    console.log(`${name}: ok`)
  }
} finally {
  await sbx.kill()
}
